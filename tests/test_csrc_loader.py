"""lora_kernels.csrc without a GPU: a fake library (gcc, the real csrc/lk_csrc.h) stands in for
lora_kernels/_csrc*.so and records what the loader passes: missing library, failed load, ABI checks,
argument marshalling (pointers, strides, stream), status codes, and the fused op's dispatch."""
import ctypes
import os
import shutil
import subprocess

import pytest
import torch

import lora_kernels
from lora_kernels import csrc
from lora_kernels.ops import configs
from lora_kernels.nf4 import read_quant_state
from tests._util import quantized

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE = r"""
#include "lk_csrc.h"
#ifndef FAKE_ABI
#define FAKE_ABI LK_CSRC_ABI_VERSION
#endif
static lk_decode_args last;
static void* last_stream;
static int calls, next_status;
int lk_abi_version(void) { return FAKE_ABI; }
int lk_args_size(void) { return (int)sizeof(lk_decode_args); }
const char* lk_status_string(int s) { return s == 0 ? "ok" : "fake failure"; }
const char* lk_last_cuda_error(void) { return "fake cuda error"; }
int lk_decode_path(const lk_decode_args* a) { return a->m <= 16 ? 1 : -1; }
int lk_fast_launch(const lk_decode_args* a, int* out) {
  last = *a; out[0] = (a->n + 15) / 16; out[1] = 4; out[2] = 4; out[3] = 132; out[4] = a->pipeline;
  out[5] = a->pipeline ? 53264 : 0; return 0;
}
int lk_linear_decode_fwd(const lk_decode_args* a, void* stream) {
  last = *a; last_stream = stream; ++calls; return next_status;
}
LK_API void fake_last_args(lk_decode_args* out) { *out = last; }
LK_API void* fake_last_stream(void) { return last_stream; }
LK_API int fake_calls(void) { return calls; }
LK_API void fake_set_status(int s) { next_status = s; }
"""


def _build(tmp_path, name, *defines):
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("gcc not found: the fake csrc library is built with it")
    src, lib = tmp_path / f"{name}.c", tmp_path / f"{name}.so"
    src.write_text(FAKE)
    cmd = [gcc, "-std=c99", "-O1", "-Wall", "-Werror", "-shared", "-fPIC", "-I", os.path.join(ROOT, "csrc"),
           *defines, str(src), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return str(lib)


@pytest.fixture
def use_lib(monkeypatch):
    """Points the loader at a library file (or None: the package's own _csrc*.so lookup) for one test."""
    def point(path):
        if path is None:
            monkeypatch.delenv("LORA_KERNELS_CSRC_LIB", raising=False)
        else:
            monkeypatch.setenv("LORA_KERNELS_CSRC_LIB", path)
        csrc.reset()
    yield point
    csrc.reset()


@pytest.fixture
def fake(tmp_path, use_lib, monkeypatch):
    """The fake library, loaded, with the CUDA-only seams opened so CPU tensors go through."""
    path = _build(tmp_path, "fake")
    use_lib(path)
    monkeypatch.setattr(csrc, "_check_devices", lambda tensors, device: None)
    monkeypatch.setattr(csrc, "_current_stream", lambda device: 0x5EED0)
    lib = ctypes.CDLL(path)  # the same handle the loader got (dlopen by path)
    lib.fake_last_stream.restype = ctypes.c_void_p
    lib.fake_last_args.argtypes = [ctypes.POINTER(csrc.DecodeArgs)]
    lib.fake_set_status(0)
    return lib


def _last(lib):
    a = csrc.DecodeArgs()
    lib.fake_last_args(ctypes.byref(a))
    return a


def test_missing_library(use_lib, monkeypatch, tmp_path):
    monkeypatch.setattr(csrc, "__file__", str(tmp_path / "csrc.py"))  # a package dir without _csrc*.so
    use_lib(None)
    st = csrc.status()
    assert not st["found"] and st["path"] is None and "not built" in st["reason"]
    assert "LORA_KERNELS_BUILD_CSRC=1" in st["reason"]
    assert not csrc.available()
    with pytest.raises(RuntimeError, match="unavailable: not built"):
        csrc._library()
    use_lib(str(tmp_path / "nowhere.so"))
    assert "does not exist" in csrc.status()["reason"]


def test_failed_load(use_lib, tmp_path):
    bad = tmp_path / "_csrc.bad.so"
    bad.write_text("not an ELF file")
    use_lib(str(bad))
    st = csrc.status()
    assert not st["found"] and st["path"] == str(bad) and st["reason"].startswith("failed to load")


def test_abi_mismatch(use_lib, tmp_path):
    use_lib(_build(tmp_path, "old", "-DFAKE_ABI=99"))
    st = csrc.status()
    assert not st["found"] and "C ABI version 99" in st["reason"]


def test_import_and_backends_survive_a_broken_library(use_lib, tmp_path):
    bad = tmp_path / "broken.so"
    bad.write_bytes(b"\x7fELF garbage")
    use_lib(str(bad))
    found = lora_kernels.backends()["csrc"]
    assert found["found"] is False and "failed to load" in found["reason"]


def test_struct_mirror_matches_header(fake):
    assert csrc.status() == dict(found=True, path=os.environ["LORA_KERNELS_CSRC_LIB"], reason=None,
                                 dispatch="auto (M <= 16)")
    assert fake.lk_args_size() == ctypes.sizeof(csrc.DecodeArgs)


@pytest.mark.parametrize("nested", [False, True])
def test_marshalling(fake, nested):
    n, k, m, r = 96, 256, 3, 8
    packed, state, _ = quantized(n, k, nested=nested, blocksize=128)
    q = read_quant_state(packed, state)
    big = torch.randn(m, k + 64, dtype=torch.bfloat16)
    x = big[:, 32:32 + k]                                          # row stride k + 64
    xa = torch.randn(r, m, dtype=torch.bfloat16).t()               # strides (1, m)
    b = torch.randn(r, n, dtype=torch.bfloat16).t()                # strides (1, n)
    bias = torch.randn(2 * n, dtype=torch.bfloat16)[::2]           # stride 2
    out = torch.empty(m, n + 5, dtype=torch.bfloat16)[:, :n]       # row stride n + 5
    got = csrc.linear_decode_fwd(x, q, xa, b, bias, 0.25, out=out)
    assert got is out and fake.fake_calls() >= 1
    a = _last(fake)
    assert (a.x, a.x_row) == (x.data_ptr(), k + 64)
    assert (a.packed, a.code, a.absmax) == (q.packed.data_ptr(), q.code.data_ptr(), q.absmax.data_ptr())
    if nested:
        assert (a.code2, a.absmax2, a.offset) == (q.code2.data_ptr(), q.absmax2.data_ptr(), q.offset.data_ptr())
        assert (a.nested, a.blocksize2) == (1, q.blocksize2)
    else:
        assert (a.code2, a.absmax2, a.offset, a.nested) == (None, None, None, 0)
    assert (a.xa, a.xa_row, a.xa_col) == (xa.data_ptr(), 1, m)
    assert (a.b, a.b_row, a.b_col) == (b.data_ptr(), 1, n)
    assert (a.bias, a.bias_stride) == (bias.data_ptr(), 2)
    assert (a.out, a.out_row) == (out.data_ptr(), n + 5)
    assert (a.m, a.n, a.k, a.r, a.blocksize) == (m, n, k, r, 128)
    assert (a.dtype, a.scaling, a.force_generic, a.device, a.decode, a.row_tiles, a.warps) == (0, 0.25, 0, 0, 2, 0, 0)
    assert fake.fake_last_stream() == 0x5EED0


def test_decode_row_tile_and_warp_settings(fake, monkeypatch):
    packed, state, _ = quantized(32, 64, nested=False)
    q = read_quant_state(packed, state)
    x = torch.randn(12, 64, dtype=torch.bfloat16)
    monkeypatch.setenv("LORA_KERNELS_CSRC_DECODE", "registers")
    monkeypatch.setenv("LORA_KERNELS_CSRC_ROW_TILES", "1")
    monkeypatch.setenv("LORA_KERNELS_CSRC_WARPS", "8")
    csrc.linear_decode_fwd(x, q, None, None, None, 1.0)
    assert (_last(fake).decode, _last(fake).row_tiles, _last(fake).warps) == (1, 1, 8)
    csrc.linear_decode_fwd(x, q, None, None, None, 1.0, decode="shared")
    assert _last(fake).decode == 0
    csrc.linear_decode_fwd(x, q, None, None, None, 1.0, decode="exact")
    assert _last(fake).decode == 2
    monkeypatch.setenv("LORA_KERNELS_CSRC_ROW_TILES", "4")
    with pytest.raises(ValueError, match="ROW_TILES"):
        csrc.linear_decode_fwd(x, q, None, None, None, 1.0)
    monkeypatch.delenv("LORA_KERNELS_CSRC_ROW_TILES")
    monkeypatch.setenv("LORA_KERNELS_CSRC_WARPS", "3")
    with pytest.raises(ValueError, match="WARPS"):
        csrc.linear_decode_fwd(x, q, None, None, None, 1.0)
    monkeypatch.delenv("LORA_KERNELS_CSRC_WARPS")
    with pytest.raises(ValueError, match="'exact', 'registers', 'shared'"):
        csrc.linear_decode_fwd(x, q, None, None, None, 1.0, decode="lut")


def test_marshalling_without_lora_fp16(fake):
    packed, state, _ = quantized(32, 64, dtype=torch.float16, nested=False)
    q = read_quant_state(packed, state)
    x = torch.randn(16, 64, dtype=torch.float16)
    out = csrc.linear_decode_fwd(x, q, None, None, None, 1.0, force_generic=True)
    a = _last(fake)
    assert out.shape == (16, 32) and out.dtype == torch.float16
    assert (a.xa, a.b, a.bias, a.r, a.dtype, a.force_generic, a.m) == (None, None, None, 0, 1, 1, 16)
    assert a.out == out.data_ptr() and a.out_row == 32


def test_bad_arguments_are_refused_before_the_call(fake):
    packed, state, _ = quantized(32, 64, nested=False)
    q = read_quant_state(packed, state)
    calls = fake.fake_calls()
    with pytest.raises(ValueError, match="M=17"):
        csrc.linear_decode_fwd(torch.randn(17, 64, dtype=torch.bfloat16), q, None, None, None, 1.0)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        csrc.linear_decode_fwd(torch.randn(2, 64), q, None, None, None, 1.0)
    with pytest.raises(ValueError, match="K=63"):
        csrc.linear_decode_fwd(torch.randn(2, 63, dtype=torch.bfloat16), q, None, None, None, 1.0)
    with pytest.raises(ValueError, match="xa and b"):
        csrc.linear_decode_fwd(torch.randn(2, 64, dtype=torch.bfloat16), q,
                               torch.randn(2, 4, dtype=torch.bfloat16), None, None, 1.0)
    with pytest.raises(TypeError, match="x's dtype"):
        csrc.linear_decode_fwd(torch.randn(2, 64, dtype=torch.bfloat16), q, torch.randn(2, 4),
                               torch.randn(32, 4), None, 1.0)
    assert fake.fake_calls() == calls


def test_library_error_is_raised(fake):
    packed, state, _ = quantized(32, 64, nested=False)
    q = read_quant_state(packed, state)
    fake.fake_set_status(2)
    with pytest.raises(RuntimeError, match="fake failure: fake cuda error"):
        csrc.linear_decode_fwd(torch.randn(2, 64, dtype=torch.bfloat16), q, None, None, None, 1.0)


def test_device_check_refuses_cpu_tensors(use_lib, tmp_path):
    use_lib(_build(tmp_path, "fake"))
    packed, state, _ = quantized(32, 64, nested=False)
    q = read_quant_state(packed, state)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        csrc.linear_decode_fwd(torch.randn(2, 64, dtype=torch.bfloat16), q, None, None, None, 1.0)


def test_device_check_names_the_tensor_on_another_device():
    from types import SimpleNamespace

    cpu, meta = torch.empty(2, device="cpu"), torch.empty(2, device="meta")
    with pytest.raises(ValueError, match="x is on cpu: the csrc kernel needs CUDA tensors"):
        csrc._check_devices([("x", cpu), ("b", meta)], cpu.device)  # a CPU x is named first, whatever else
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)  # device objects only: nothing runs there
    on = [("x", SimpleNamespace(device=gpu0)), ("b", SimpleNamespace(device=gpu1))]
    with pytest.raises(ValueError, match="b is on cuda:1, x on cuda:0: every tensor must be on one CUDA device"):
        csrc._check_devices(on, gpu0)
    csrc._check_devices(on[:1], gpu0)


def test_use_for_forward(use_lib, fake, monkeypatch, tmp_path):
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert csrc.use_for_forward(x, True, forced=False) is False          # CPU tensors: never by default
    with pytest.raises(ValueError, match="LORA_KERNELS_PATH=csrc, but x is on cpu"):
        csrc.use_for_forward(x, True, forced=True)
    monkeypatch.setattr(csrc, "unsupported_reason", lambda x, is_4bit: None)  # as if CUDA
    assert csrc.use_for_forward(x, True, forced=False) is True
    use_lib(str(tmp_path / "missing.so"))
    assert csrc.use_for_forward(x, True, forced=False) is False
    with pytest.raises(RuntimeError, match="unavailable: not found"):
        csrc.use_for_forward(x, True, forced=True)


def _qlora_inputs(m=3, n=32, k=64, r=4):
    packed, state, _ = quantized(n, k, nested=True)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    return x, packed, state, torch.randn(r, k) / 8, torch.randn(n, r) / 2


def test_fused_op_dispatches_to_the_library(fake, monkeypatch):
    """lora_kernels::linear_fwd on the Triton path (the interpreter here) hands the base + epilogue to the
    library when it applies (faked here as CUDA), with the rank kernel's xa and B in x's dtype."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton path runs on CPU only through the interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setattr(csrc, "unsupported_reason", lambda x, is_4bit: None if is_4bit else "dense")
    x, packed, state, a, b = _qlora_inputs()
    calls = fake.fake_calls()
    monkeypatch.setattr(csrc, "AUTO_DISPATCH", False)
    lora_kernels.qlora_linear(x, packed, state, a, b, 0.5)
    assert fake.fake_calls() == calls  # without auto dispatch, auto leaves the library out
    monkeypatch.setattr(csrc, "AUTO_DISPATCH", True)
    lora_kernels.qlora_linear(x, packed, state, a, b, 0.5)
    assert fake.fake_calls() == calls + 1
    got = _last(fake)
    assert (got.m, got.n, got.k, got.r, got.nested, got.dtype, got.scaling) == (3, 32, 64, 4, 1, 0, 0.5)
    assert got.decode == csrc.DECODES["exact"]  # the default decode: bitsandbytes' roundings
    assert got.xa and got.b and got.bias is None
    monkeypatch.setattr(configs, "DEQUANT_PATH_MIN_M", 1)  # auto takes it whichever Triton path M would take
    lora_kernels.qlora_linear(x, packed, state, a, b, 0.5)
    assert fake.fake_calls() == calls + 2
    calls += 1
    monkeypatch.setenv("LORA_KERNELS_PATH", "fused")  # forcing Triton keeps the library out
    lora_kernels.qlora_linear(x, packed, state, a, b, 0.5)
    assert fake.fake_calls() == calls + 1
    monkeypatch.setenv("LORA_KERNELS_PATH", "csrc")
    lora_kernels.qlora_linear(x, packed, state, a, b, 0.5)
    assert fake.fake_calls() == calls + 2


@pytest.mark.parametrize("path", ["csrc", "fused", "dequant"])
def test_inference_calls_read_no_tensor_on_the_host(fake, monkeypatch, path):
    """Without dropout the op's forward never reads a tensor's value on the host: on CUDA such a read
    synchronizes with the GPU, and it breaks the CUDA-graph capture of a decode step (generation with
    static caches, torch.compile mode="reduce-overhead"). tests/test_gpu.py captures one on a GPU."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton path runs on CPU only through the interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setattr(csrc, "unsupported_reason", lambda x, is_4bit: None if is_4bit else "dense")
    monkeypatch.setenv("LORA_KERNELS_PATH", path)
    x, packed, state, a, b = _qlora_inputs()
    calls = fake.fake_calls()
    lora_kernels.qlora_linear(x, packed, state, a, b, 0.5)  # first call: compiles, loads, fills caches

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    with torch.no_grad():
        lora_kernels.qlora_linear(x, packed, state, a, b, 0.5, bias=torch.randn(32, dtype=torch.bfloat16))
        lora_kernels.qlora_linear(x, packed, state, a, b, 0.5, dropout_p=0.1, training=False)
    monkeypatch.undo()
    assert fake.fake_calls() - calls == (3 if path == "csrc" else 0)


def test_forced_csrc_without_the_library_raises(use_lib, monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton path runs on CPU only through the interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setenv("LORA_KERNELS_PATH", "csrc")
    use_lib(str(tmp_path / "missing.so"))
    x, packed, state, a, b = _qlora_inputs()
    with pytest.raises(ValueError, match="LORA_KERNELS_PATH=csrc, but x is on cpu"):
        lora_kernels.qlora_linear(x, packed, state, a, b, 0.5)
    monkeypatch.setattr(csrc, "unsupported_reason", lambda x, is_4bit: None)
    with pytest.raises(RuntimeError, match="CUDA library is unavailable: not found"):
        lora_kernels.qlora_linear(x, packed, state, a, b, 0.5)


def test_launch_plan_and_depth(fake, monkeypatch):
    packed, state, _ = quantized(64, 128, nested=False)
    q = read_quant_state(packed, state)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    assert csrc.launch_plan(x, q) == dict(ctas=4, warps=4, resident_per_sm=4, sms=132, pipeline="ring", smem=0)
    assert _last(fake).decode == csrc.DECODES["exact"] and _last(fake).n == 64
    assert _last(fake).pipeline == 0  # the register ring stays the default until the cp.async one ran on a GPU
    assert csrc.launch_plan(x, q, pipeline="async") == dict(ctas=4, warps=4, resident_per_sm=4, sms=132,
                                                            pipeline="async", smem=53264)
    monkeypatch.setenv("LORA_KERNELS_CSRC_PIPELINE", "async")
    csrc.linear_decode_fwd(x, q, None, None, None, 1.0)
    assert _last(fake).pipeline == 1
    csrc.linear_decode_fwd(x, q, None, None, None, 1.0, pipeline="ring")  # the argument wins
    assert _last(fake).pipeline == 0
    monkeypatch.setenv("LORA_KERNELS_CSRC_PIPELINE", "stages")
    with pytest.raises(ValueError, match="LORA_KERNELS_CSRC_PIPELINE"):
        csrc.linear_decode_fwd(x, q, None, None, None, 1.0)
    monkeypatch.delenv("LORA_KERNELS_CSRC_PIPELINE")
    monkeypatch.setenv("LORA_KERNELS_CSRC_DEPTH", "2")
    csrc.linear_decode_fwd(x, q, None, None, None, 1.0)
    assert _last(fake).depth == 2
    monkeypatch.setenv("LORA_KERNELS_CSRC_DEPTH", "3")
    with pytest.raises(ValueError, match="DEPTH"):
        csrc.linear_decode_fwd(x, q, None, None, None, 1.0)


def test_loads_only_measurement(fake):
    """csrc.loads_only_fwd (bench_decode's loads-alone timing) sends decode 3 with otherwise checked arguments."""
    packed, state, _ = quantized(64, 128, nested=True)
    q = read_quant_state(packed, state)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    out = torch.empty(2, 64, dtype=torch.bfloat16)
    assert csrc.loads_only_fwd(x, q, None, None, out) is out
    assert (_last(fake).decode, _last(fake).m, _last(fake).nested) == (3, 2, 1)
    with pytest.raises(ValueError, match="unit inner stride"):
        csrc.loads_only_fwd(x, q, None, None, out.t())


def test_gpus_older_than_sm80_keep_the_triton_path(monkeypatch):
    """The library holds sm_80/sm_90 code and sm_90 PTX: on a T4 (sm_75) auto must not hand it a launch."""
    from types import SimpleNamespace

    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(1, 64))
    monkeypatch.setattr(csrc, "_capability", lambda index: (7, 5))
    assert csrc.unsupported_reason(x, True) == "the GPU is sm_75; the kernel needs sm_80 or newer"
    assert not csrc.use_for_forward(x, True, forced=False)
    with pytest.raises(ValueError, match="LORA_KERNELS_PATH=csrc, but the GPU is sm_75"):
        csrc.use_for_forward(x, True, forced=True)
    monkeypatch.setattr(csrc, "_capability", lambda index: (8, 6))
    assert csrc.unsupported_reason(x, True) is None
