"""Test-only stand-in for torchaudio.transforms (see tests/stubs/torchaudio/__init__.py)."""
from . import _unavailable


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable("transforms." + name)
