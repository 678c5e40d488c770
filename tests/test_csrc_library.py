"""The built library's host side on CPU (no GPU needed): ABI checks, which kernel each shape takes, and
argument refusal before any CUDA call. Skipped when lora_kernels/_csrc*.so is not built (.ci/csrc.sh
builds it first)."""
import ctypes

import pytest
import torch

from lora_kernels import csrc


@pytest.fixture(scope="module")
def lib():
    csrc.reset()
    st = csrc.status()
    if not st["found"]:
        pytest.skip(f"csrc library not available: {st['reason']}")
    return csrc._library()


def args(**kw):
    base = dict(x=0x10000, x_row=4096, packed=0x20000, code=0x30000, absmax=0x40000, out=0x50000, out_row=4096,
                m=1, n=4096, k=4096, r=0, blocksize=64, blocksize2=0, nested=0, dtype=0, scaling=1.0)
    base.update(kw)
    return csrc.DecodeArgs(**base)


def path(lib, **kw):
    return lib.lk_decode_path(ctypes.byref(args(**kw)))


def test_abi(lib):
    assert lib.lk_abi_version() == csrc.ABI_VERSION
    assert lib.lk_args_size() == ctypes.sizeof(csrc.DecodeArgs)
    assert lib.lk_status_string(1).decode().startswith("bad argument")


def test_fast_or_generic(lib):
    assert path(lib) == 1
    assert path(lib, m=16, k=4096 + 64, blocksize=128) == 1                 # masked 64-wide tail
    assert path(lib, nested=1, blocksize2=256, code2=1, absmax2=1, offset=1) == 1
    assert path(lib, k=4096 + 32) == 0                                      # K % 64 != 0
    assert path(lib, k=4097) == 0                                           # odd K: a byte spans two rows
    assert path(lib, blocksize=32) == 0
    assert path(lib, x=0x10008) == 0                                        # x not 16-byte aligned
    assert path(lib, packed=0x20004) == 0
    assert path(lib, m=2, x_row=4100) == 0                                  # x rows not 16-byte aligned
    assert path(lib, nested=1, blocksize2=100, code2=1, absmax2=1, offset=1) == 0
    assert path(lib, force_generic=1) == 0
    assert path(lib, decode=2) == path(lib, decode=1) == path(lib, warps=16) == path(lib, depth=1) == 1
    assert path(lib, decode=3) == 1  # loads only (measurement): M <= 8, default depth
    assert path(lib, pipeline=1) == path(lib, pipeline=1, m=16, decode=1) == 1  # cp.async stages
    assert path(lib, pipeline=1, m=16, row_tiles=2, warps=8) == path(lib, pipeline=1, m=16, row_tiles=1, warps=16) == 1
    # a nested absmax that is not 4-byte aligned still takes the fast kernel (the register ring)
    assert path(lib, pipeline=1, nested=1, blocksize2=256, code2=1, absmax2=1, offset=1, absmax=0x40001) == 1


def test_bad_arguments(lib):
    for bad in (dict(m=0), dict(m=17), dict(n=0), dict(k=0), dict(dtype=2), dict(x=0), dict(out=0),
                dict(r=4), dict(nested=1, blocksize2=256), dict(n=65536, k=32768), dict(device=-1), dict(row_tiles=3),
                dict(decode=4), dict(decode=-1), dict(decode=3, m=9), dict(decode=3, depth=2), dict(warps=3), dict(warps=32), dict(warps=-1),
                dict(depth=3), dict(depth=8), dict(pipeline=2), dict(pipeline=-1),
                # the register ring's measurement knobs do not apply to the cp.async pipeline
                dict(pipeline=1, depth=2), dict(pipeline=1, decode=3),
                # the async kernel's two row tiles take at most 8 warps
                dict(pipeline=1, m=16, row_tiles=2, warps=16), dict(pipeline=1, m=16, warps=16),
                dict(pipeline=1, m=4, row_tiles=2, warps=16)):
        assert path(lib, **bad) < 0, bad
        assert lib.lk_linear_decode_fwd(ctypes.byref(args(**bad)), None) == 1, bad


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path of a machine without a GPU")
def test_no_gpu_is_a_cuda_error(lib):
    assert lib.lk_linear_decode_fwd(ctypes.byref(args()), None) == 2
    # the async launcher's occupancy queries fail too: a CUDA error, not a crash or a silent no-op
    assert lib.lk_linear_decode_fwd(ctypes.byref(args(pipeline=1)), None) == 2
    assert lib.lk_linear_decode_fwd(ctypes.byref(args(pipeline=1, m=16)), None) == 2
    out = (ctypes.c_int * 6)()
    assert lib.lk_fast_launch(ctypes.byref(args(pipeline=1)), out) == 2
    assert lib.lk_fast_launch(ctypes.byref(args()), out) == 2  # the occupancy query needs a device too
    assert lib.lk_fast_launch(ctypes.byref(args(m=0)), out) == 1
    assert lib.lk_last_cuda_error().decode()  # the CUDA runtime's own message
