"""Shared helpers of the kernel tests: quantized weights, error bounds."""
import copy

import bitsandbytes.functional as bnbF
import torch


def quantized(n, k, *, dtype=torch.bfloat16, quant_type="nf4", nested=True, blocksize=64,
              quant_storage=torch.uint8, seed=0, device="cpu"):
    """(packed, quant_state, dense W as bitsandbytes dequantizes it) for a random [n, k] weight."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(device)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                       compress_statistics=nested, quant_storage=quant_storage)
    return packed, state, bnb_dequantize(packed, state)


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit of the flat weight, reshaped: its CPU decode of the 2-D shape is wrong
    when in_features % 16 == 0 but in_features % blocksize != 0 (0.50.2; test_nf4.py shows it)."""
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    return bnbF.dequantize_4bit(packed, flat).view(state.shape)


def capture_cuda_graph(fn, warmups=1):
    """(graph, what fn returned inside the capture): fn run `warmups` times on a side stream first (compiles,
    autotuning, cached allocations stay out of the capture), then captured once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_oracle(got, oracle, native, *, factor=2.0, atol=1e-5, what="output"):
    """`got`'s error against the fp64 `oracle` may be at most `factor` times the error of PyTorch's own
    low-precision computation `native` of the same thing, plus `atol` (DESIGN.md: tolerance that means something)."""
    err = max_err(got, oracle)
    bound = factor * max_err(native, oracle) + atol * max(1.0, oracle.abs().max().item())
    assert err <= bound, f"{what}: error {err:.3e} exceeds {factor} x PyTorch's own {max_err(native, oracle):.3e} + atol"
