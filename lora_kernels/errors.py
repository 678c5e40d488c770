"""Exceptions and warnings the package raises on purpose."""


class FallbackWarning(UserWarning):
    """A patched layer ran PEFT's own forward instead of the fused kernels; the message says why."""


class CLIError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""
