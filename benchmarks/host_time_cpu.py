"""Host time per qlora_linear call on the GPU code path, measured on a CPU machine: the Triton path runs
through the interpreter with every kernel launch stubbed out, so what is timed is our Python, the PyTorch ops
around the kernels (small matmuls included, on CPU) and the autograd machinery, not Triton's launcher or any
kernel. A CPU proxy for the host-time figures of benchmarks/results/h200-probe-2026-11-29.md; measured. The
last lines time a decode-shape call without gradients on the dequantize and csrc paths (a fake library).

    python benchmarks/host_time_cpu.py          # from the project root
"""
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"
os.environ["LORA_KERNELS_BACKEND"] = "triton"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import lora_kernels as lk  # noqa: E402
from tests._util import quantized  # noqa: E402


def main():
    interpreter.GridExecutor.__call__ = lambda self, *args, **kwargs: None  # launches cost nothing here
    torch.set_num_threads(1)
    packed, state, _ = quantized(96, 128)
    x = torch.randn(16, 128, dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(8, 128) / 10).requires_grad_()
    b = (torch.randn(96, 8) / 10).requires_grad_()
    bias = torch.randn(96, dtype=torch.bfloat16)
    dy = torch.randn(16, 96, dtype=torch.bfloat16)

    def fwd(p):
        return lk.qlora_linear(x, packed, state, a, b, 0.5, bias=bias, dropout_p=p, training=True)

    def fwd_bwd(p):
        fwd(p).backward(dy)

    print("host us per call, 96x128 4-bit W, M = 16, r = 8, launches stubbed (median of 7 x 200 calls)")
    for path in ("dequant", "fused"):
        os.environ["LORA_KERNELS_PATH"] = path
        for p in (0.0, 0.1):
            for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                for _ in range(30):
                    fn(p)
                runs = []
                for _ in range(7):
                    t0 = time.perf_counter()
                    for _ in range(200):
                        fn(p)
                    runs.append((time.perf_counter() - t0) / 200 * 1e6)
                print(f"  {path:8s} dropout {p:<4} {name:8s} {statistics.median(runs):7.1f}")
    inference(packed, state, a.detach(), b.detach())


def _median_us(fn, calls=300, runs=7):
    for _ in range(30):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def inference(packed, state, a, b):
    """A decode-shape call without gradients (generation), on the dequantize path and on the csrc path with
    the tests' fake library standing in for the CUDA one (its launch is a no-op C call)."""
    import subprocess
    import tempfile

    from lora_kernels import csrc
    from tests.test_csrc_loader import FAKE

    x = torch.randn(1, 128, dtype=torch.bfloat16)
    print("host us per call, no grad, M = 1, r = 8 (median of 7 x 300 calls)")
    os.environ["LORA_KERNELS_PATH"] = "dequant"
    with torch.no_grad():
        print(f"  dequant  {_median_us(lambda: lk.qlora_linear(x, packed, state, a, b, 0.5)):7.1f}")
    with tempfile.TemporaryDirectory() as d:
        src, lib = os.path.join(d, "fake.c"), os.path.join(d, "fake.so")
        with open(src, "w") as f:
            f.write(FAKE)
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
        subprocess.run(["gcc", "-std=c99", "-O1", "-shared", "-fPIC", "-I", os.path.join(root, "csrc"), src, "-o", lib],
                       check=True)
        os.environ["LORA_KERNELS_CSRC_LIB"] = lib
        csrc.reset()
        csrc._check_devices = lambda tensors, device: None  # CPU tensors through the CUDA-only seams
        csrc._current_stream = lambda device: 0
        csrc.unsupported_reason = lambda x, is_4bit: None
        os.environ["LORA_KERNELS_PATH"] = "auto"
        with torch.no_grad():
            print(f"  csrc     {_median_us(lambda: lk.qlora_linear(x, packed, state, a, b, 0.5)):7.1f}  (fake library)")
            layer, x3 = _patched_layer(d)
            print(f"  csrc, a patched PEFT Linear4bit layer {_median_us(lambda: layer(x3)):7.1f}  (fake library)")


def _patched_layer(tmp):
    """The first LoRA layer of a tiny patched 4-bit Llama (tests/_models.py), in eval mode, with an x of one
    token; the patched forward runs the op on CPU (LORA_KERNELS_PATCH_CPU=op)."""
    from tests._models import load_peft, lora_layers, save_model

    os.environ["LORA_KERNELS_PATCH_CPU"] = "op"
    save_model(tmp)
    model = load_peft(tmp).eval()
    lk.patch_peft_model(model)
    layer = next(iter(lora_layers(model).values()))
    return layer, torch.randn(1, 1, layer.base_layer.in_features, dtype=torch.bfloat16)


if __name__ == "__main__":
    main()
