"""A Triton compile error that escapes the autotuner (an old triton, a new arch) must not kill a training step
unexplained: the op falls back to dequantize + matmul and warns once, naming the Triton version, the kernel and
the config. The failure is simulated by a kernel whose launch raises what a failed MLIR pipeline raises."""
import warnings

import pytest
import torch
import triton

import lora_kernels as lk
from lora_kernels.ops import fused_linear, fused_linear_kernels as flk
from tests._util import quantized


class _Unbuildable:
    """Stands in for a jit kernel whose compilation fails (triton 3.6's error on the old joined W tile)."""

    def __init__(self, real):
        self.fn = real.fn if hasattr(real, "fn") else real
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise RuntimeError("PassManager::run failed: Pipeline failed while executing "
                               "[`TritonGPUOptimizeDotOperands` on 'builtin.module' operation]")
        return launch


@pytest.fixture
def broken(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setattr(fused_linear, "_UNBUILDABLE", set())
    fwd, dx = _Unbuildable(flk._qlora_fwd), _Unbuildable(flk._qlora_dx)
    for name, fake in (("_qlora_fwd", fwd), ("_qlora_dx", dx), ("_qlora_fwd_tuned", fwd), ("_qlora_dx_tuned", dx)):
        monkeypatch.setattr(flk, name, fake)
    return fwd, dx


def test_build_error_falls_back_once_and_says_why(broken):
    fwd, dx = broken
    n, k, r = 48, 64, 8
    packed, state, w = quantized(n, k, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(r, k, generator=gen) / 8).requires_grad_()
    b = (torch.randn(n, r, generator=gen) / 8).requires_grad_()
    x = torch.randn(5, k, generator=gen).to(torch.bfloat16).requires_grad_()
    with pytest.warns(lk.FallbackWarning) as record:
        y = lk.qlora_linear(x, packed, state, a, b, 0.5)
        y.float().sum().backward()
    messages = [str(r.message) for r in record if issubclass(r.category, lk.FallbackWarning)]
    assert len(messages) == 2, messages  # forward and backward, once each
    assert f"Triton {triton.__version__}" in messages[0] and "_qlora_fwd_kernel" in messages[0]
    assert "16x32x32" in messages[0] and "dequantize + matmul" in messages[0]
    assert "_qlora_dx_kernel" in messages[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.FallbackWarning)  # once: later calls fall back silently
        y2 = lk.qlora_linear(x, packed, state, a, b, 0.5)
    assert fwd.launches == 1 and dx.launches == 1  # the broken kernel is not tried again
    expected = x.float() @ w.float().t() + 0.5 * (x.float() @ a.t()) @ b.t()
    assert torch.allclose(y.float(), expected, rtol=2e-2, atol=2e-2)
    assert torch.equal(y, y2)
    assert x.grad is not None and a.grad is not None and torch.isfinite(x.grad).all()


def test_other_errors_are_not_swallowed(monkeypatch):
    """Only compile errors fall back: a bad argument or a CUDA error still raises."""
    assert flk.build_error(RuntimeError("PassManager::run failed"))
    assert not flk.build_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not flk.build_error(ValueError("bad shape"))


def test_autotuned_configs_name_themselves():
    """On a GPU the autotuner picks the config: each one notes its name before it is launched or compiled, so
    the error can name the config that failed."""
    from lora_kernels.ops import configs

    seen = []
    for cfg, tile in zip(configs.gemm_configs(note=seen.append), configs.all_gemm_configs()):
        cfg.pre_hook({})
        assert seen[-1] == configs.config_name(*tile)
