"""Test-only stand-in for torchaudio.functional (see tests/stubs/torchaudio/__init__.py)."""
from . import _unavailable


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable("functional." + name)
