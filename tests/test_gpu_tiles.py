"""The GPU's own tiles, run through the interpreter: every GEMM config a launch can draw on sm_90 (with the
GPU's GROUP_M), and the rank kernels' GPU tiles with dA split over M, against fp64 oracles.

Elsewhere the interpreter runs one small tile; the code that only the GPU's tiles reach (the forward's K
sub-steps when BLOCK_K spans several blocks, dx's per-row scales, masked tails of 128-wide tiles, the dA
reduction over splits) is checked here. Shapes are sized from each tile: two tiles per dimension with a
masked tail, at least three steps of the main loop.
"""
import pytest
import torch

from lora_kernels import reference
from lora_kernels.nf4 import read_quant_state
from lora_kernels.ops import configs
from lora_kernels.ops.common import INTERPRETED
from lora_kernels.ops.fused_linear_kernels import (BASE_4BIT, BASE_DENSE, launch_fused_linear, launch_lora_grad_a,
                                                   launch_qlora_dx, launch_qlora_fwd)
from lora_kernels.nf4 import block_scales
from tests._util import assert_close_to_oracle, quantized

pytestmark = pytest.mark.slow
ARCH = 90
R = 40  # two rank chunks of GEMM_RANK_BLOCK_MAX (32), the second masked
SCALING = 0.75
P = 0.25
SEED = 12347


def _drawable(kind, dtype_bytes):
    """sm_90 configs this launch kind draws for some M bucket, each with an M that draws it."""
    out = []
    for cfg in configs.all_gemm_configs():
        for m in (13, 512):
            if any(configs.config_allowed(*cfg, m=m, kind=kind, dtype_bytes=dtype_bytes, dropout=d, arch=ARCH)
                   for d in (False, True)):
                out.append((cfg, m if cfg[0] == 16 else cfg[0] + 5))
                break
    return out


def _cases(kind):
    return [pytest.param(dt, cfg, m, id=f"{dt_name}-{'x'.join(map(str, cfg[:3]))}-w{cfg[3]}")
            for dt, dt_name, size in ((torch.bfloat16, "bf16", 2), (torch.float32, "fp32", 4))
            for cfg, m in _drawable(kind, size)]


def _tile(cfg):
    return dict(BLOCK_M=cfg[0], BLOCK_N=cfg[1], BLOCK_K=cfg[2], GROUP_M=configs.GROUP_M)


def _tol(dtype):
    # The interpreter truncates fp32 -> bf16 where CUDA rounds (DESIGN.md): one bf16 ulp more there.
    return dict(factor=2.0, atol=2.0**-7 if (INTERPRETED and dtype == torch.bfloat16) else 1e-5)


def _weight(n, k, dtype, nested, seed=0):
    packed, state, w = quantized(n, k, dtype=dtype if dtype != torch.float32 else torch.bfloat16, nested=nested,
                                 seed=seed)
    q = read_quant_state(packed, state)
    # bitsandbytes' own decode in the compute dtype (fp32: the exact fp32 decode, never rounded to 16 bits)
    w = reference.dequantize_4bit_ref(q, dtype)
    return q, w


def _rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _forward_case(dtype, cfg, m, k, nested):
    bm, bn, bk = cfg[:3]
    n = 2 * bn - 8  # W rows fill the MMA: two tiles, the second masked
    q, w = _weight(n, k, dtype, nested)
    x = _rand(m, k, dtype=dtype, seed=1)
    xa = _rand(m, R, dtype=dtype, seed=2)
    b = _rand(n, R, dtype=dtype, seed=3) / R**0.5
    bias = _rand(n, dtype=dtype, seed=4)
    out = torch.empty(m, n, dtype=dtype)
    launch_qlora_fwd(x, q, out, xa=xa, b=b, bias=bias, scaling=SCALING, config=_tile(cfg))

    def ref(t):
        return t(x) @ t(w).t() + SCALING * (t(xa) @ t(b).t()) + t(bias)

    assert_close_to_oracle(out, ref(lambda t: t.double()), ref(lambda t: t), **_tol(dtype), what="y")


def _dx_case(dtype, cfg, m, k, nested, p):
    bm, bn, bk = cfg[:3]
    n = 2 * bk + 40  # the reduction: three steps, the last masked
    q, w = _weight(n, k, dtype, nested)
    dy = _rand(m, n, dtype=dtype, seed=5)
    dxa = _rand(m, R, dtype=dtype, seed=6)
    a = _rand(R, k, dtype=dtype, seed=7) / k**0.5
    dx = torch.empty(m, k, dtype=dtype)
    launch_qlora_dx(dy, q, dx, dxa=dxa, a=a, scaling=SCALING, dropout_p=p, seed=SEED, config=_tile(cfg))
    keep = reference.dropout_keep_mask(SEED, m, k, p) if p else torch.ones(m, k, dtype=torch.bool)

    def ref(t):
        low = SCALING * (t(dxa) @ t(a))
        return t(dy) @ t(w) + torch.where(keep, low / (1.0 - p), torch.zeros((), dtype=low.dtype))

    assert_close_to_oracle(dx, ref(lambda t: t.double()), ref(lambda t: t), **_tol(dtype), what="dx")


@pytest.mark.parametrize("dtype,cfg,m", _cases("qlora_fwd"))
def test_forward_gpu_tile(dtype, cfg, m):
    """K a multiple of the blocksize with BLOCK_K over it (one scale per row per sub-step), nested; then an
    even K that is not (a scale per byte), not nested."""
    bk = cfg[2]
    _forward_case(dtype, cfg, m, k=2 * bk + 64, nested=True)
    _forward_case(dtype, cfg, m, k=2 * bk + 34, nested=False)


@pytest.mark.parametrize("dtype,cfg,m", _cases("qlora_dx"))
def test_dx_gpu_tile(dtype, cfg, m):
    """dx with dropout (nested, K aligned: per-row scales when BLOCK_N fits in a block) and without
    (not nested, K not aligned)."""
    bn = cfg[1]
    _dx_case(dtype, cfg, m, k=2 * bn + 64, nested=True, p=P)
    _dx_case(dtype, cfg, m, k=2 * bn + 34, nested=False, p=0.0)


@pytest.mark.parametrize("dtype,cfg,m", _cases("4bit_odd"))
def test_odd_k_gpu_tile(dtype, cfg, m):
    """Odd in_features (bytes straddle rows, per-element decode), forward and dx with dropout."""
    bm, bn, bk = cfg[:3]
    n, k = 2 * bn - 8, 2 * bk + 33
    q, w = _weight(n, k, dtype, nested=True)
    x = _rand(m, k, dtype=dtype, seed=1)
    out = torch.empty(m, n, dtype=dtype)
    launch_fused_linear(x, q.packed, (1, k), BASE_4BIT, out, code=q.code, scales=block_scales(q).contiguous(),
                        blocksize=q.blocksize, config=_tile(cfg))
    assert_close_to_oracle(out, x.double() @ w.double().t(), x @ w.t(), **_tol(dtype), what="y")
    dy = _rand(m, n, dtype=dtype, seed=5)
    dxa = _rand(m, R, dtype=dtype, seed=6)
    a = _rand(R, k, dtype=dtype, seed=7) / k**0.5
    dx = torch.empty(m, k, dtype=dtype)
    launch_fused_linear(dy, q.packed, (k, 1), BASE_4BIT, dx, code=q.code, scales=block_scales(q).contiguous(),
                        blocksize=q.blocksize, left=dxa, right=a, right_strides=(a.stride(0), a.stride(1)),
                        scaling=SCALING, dropout_p=P, seed=SEED, config=_tile(cfg))
    keep = reference.dropout_keep_mask(SEED, m, k, P)

    def ref(t):
        return t(dy) @ t(w) + torch.where(keep, SCALING * (t(dxa) @ t(a)) / (1 - P), torch.zeros((), dtype=t(a).dtype))

    assert_close_to_oracle(dx, ref(lambda t: t.double()), ref(lambda t: t), **_tol(dtype), what="dx")


@pytest.mark.parametrize("dtype,cfg,m", _cases("dense"))
def test_dense_gpu_tile(dtype, cfg, m):
    bm, bn, bk = cfg[:3]
    n, k = 2 * bn - 8, 2 * bk + 24
    w = _rand(n, k, dtype=dtype, seed=9) / k**0.5
    x = _rand(m, k, dtype=dtype, seed=1)
    xa = _rand(m, R, dtype=dtype, seed=2)
    b = _rand(n, R, dtype=dtype, seed=3) / R**0.5
    out = torch.empty(m, n, dtype=dtype)
    launch_fused_linear(x, w, (w.stride(1), w.stride(0)), BASE_DENSE, out, left=xa, right=b,
                        right_strides=(b.stride(1), b.stride(0)), scaling=SCALING, config=_tile(cfg))

    def ref(t):
        return t(x) @ t(w).t() + SCALING * (t(xa) @ t(b).t())

    assert_close_to_oracle(out, ref(lambda t: t.double()), ref(lambda t: t), **_tol(dtype), what="y")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("split", [1, 3])
def test_lora_grad_a_gpu_tiles_and_splits(dtype, split):
    """dA = dxa^T drop(x) with the GPU's rank tiles, the M rows split over programs and the partial sums added."""
    tiles, cap = configs.lora_config(torch.tensor([], dtype=dtype).element_size())
    tiles = {k: v for k, v in tiles.items() if k.startswith("BLOCK")}
    m, k = 4 * tiles["BLOCK_M"] + 7, tiles["BLOCK_K"] + 40
    dxa = _rand(m, R, dtype=dtype, seed=11)
    x = _rand(m, k, dtype=dtype, seed=12)
    got = launch_lora_grad_a(dxa, x, P, SEED, tiles=tiles, split=split)
    keep = reference.dropout_keep_mask(SEED, m, k, P)

    def ref(t):
        return t(dxa).t() @ torch.where(keep, t(x) / (1 - P), torch.zeros((), dtype=t(x).dtype))

    assert_close_to_oracle(got, ref(lambda t: t.double()), ref(lambda t: t.float()), factor=2.0, atol=1e-5,
                           what="dA")
