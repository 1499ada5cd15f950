"""Test-only stand-in for torchaudio: importable, raises when anything in it is used.

Newer ComfyUI imports torchaudio at module level (e.g. comfy/sd.py through its audio VAEs and
text encoders), but the package index here has no torchaudio build for the torch the tests pin.
InDomain never touches audio, so scripts/test.sh and scripts/demo.sh put this folder on PYTHONPATH
only when the real torchaudio cannot be imported. Never shipped, never on a user's path.
"""

__version__ = "0.0.0+indomain.test.stand.in"
STAND_IN = True


def _unavailable(name: str):
    def fail(*_args, **_kwargs):
        raise RuntimeError(f"torchaudio.{name} called, but this is InDomain's test stand-in for torchaudio "
                           "(tests/stubs/torchaudio). Install the torchaudio build matching your torch for audio work.")
    fail.__name__ = name
    return fail


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable(name)
