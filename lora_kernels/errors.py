"""Exceptions and warnings the package raises on purpose."""


class FallbackWarning(UserWarning):
    """A patched layer ran PEFT's own forward (or the op its dequantize + matmul path) instead of the fused
    kernels; the message says why."""


class KernelBuildError(RuntimeError):
    """A Triton kernel failed to compile on this GPU and Triton version (an error the autotuner let through)."""

    def __init__(self, kernel, config, triton_version, cause):
        self.kernel, self.config, self.triton_version = kernel, config, triton_version
        super().__init__(f"Triton {triton_version} failed to build {kernel} with config {config}: "
                         f"{type(cause).__name__}: {str(cause).strip()[:300]}")


class CLIError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""
