"""Environment settings read on per-call paths.

os.environ.get encodes the key and decodes the value on every call (~0.6 us on the CI machine; a decode-shape
call of the op reads up to eight settings). On POSIX CPython, os.environ keeps a bytes -> bytes dict in
`_data` that its __setitem__ and __delitem__ (and so monkeypatch.setenv) keep current; reading it gives the
same answer in a tenth of the time. Anywhere else os.environ.get is used.
"""
import os

_POSIX = os.name == "posix"


def getenv(name: str, default: str = "") -> str:
    """os.environ.get(name, default) for an ASCII name, faster on POSIX."""
    data = getattr(os.environ, "_data", None) if _POSIX else None
    if type(data) is not dict:
        return os.environ.get(name, default)
    value = data.get(name.encode())
    return default if value is None else os.fsdecode(value)
