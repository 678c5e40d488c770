"""Helpers of the benchmark suites (a module of its own, so that `tests/conftest.py` never shadows it)."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
SIZE = os.environ.get("LK_BENCH_SIZE", "full" if HAS_CUDA else "smoke").strip().lower()
if SIZE not in ("smoke", "full"):
    raise pytest.UsageError(f"LK_BENCH_SIZE={SIZE!r}: choose smoke or full")
if SIZE == "full" and not HAS_CUDA:
    raise pytest.UsageError("LK_BENCH_SIZE=full needs a CUDA device (Llama-3-8B shapes); use smoke on CPU")

if not HAS_CUDA:
    torch.set_num_threads(1)  # CPU smoke: stable on a busy 2-core CI box (oversubscribed OpenMP stalls at random)

ROWS = []  # rows for --lk-csv, appended at the end of the session


def _clear(tensors):
    for t in tensors:
        t.grad = None


def peak_memory_mb(fn, grad_to_none=()):
    """Peak allocated MiB over one call (None on CPU)."""
    if not HAS_CUDA:
        return None
    import gc

    _clear(grad_to_none)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    _clear(grad_to_none)
    return torch.cuda.max_memory_allocated() / 2**20


def run_benchmark(benchmark, fn, *, grad_to_none=(), rounds, warmup_rounds, flush=True):
    """benchmark.pedantic with an untimed setup per round (grad reset, L2 flush, synchronize on CUDA).
    Returns the per-round times in ms, or [] when pytest-benchmark is disabled."""
    if HAS_CUDA:
        from lora_kernels.bench.timing import FLUSH_BYTES

        buf = torch.empty(FLUSH_BYTES if flush else 1, dtype=torch.int8, device=DEVICE)

        def setup():
            _clear(grad_to_none)
            buf.zero_()
            torch.cuda.synchronize()

        def target():
            fn()
            torch.cuda.synchronize()
    else:
        def setup():
            _clear(grad_to_none)

        target = fn
    fn()  # compile / autotune outside pytest-benchmark's warm-up accounting
    if HAS_CUDA:
        torch.cuda.synchronize()
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    _clear(grad_to_none)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    data = getattr(stats, "data", None) or []
    return [t * 1e3 for t in data]


def record_row(bench, provider, m, n, k, r, times_ms, peak_mb, env, dtype="bf16"):
    """Keeps a CSV row for --lk-csv (nothing when the benchmark was disabled)."""
    if not times_ms:
        return None
    from lora_kernels.bench.results import make_row
    from lora_kernels.bench.timing import quantiles

    row = make_row(bench, provider, m, n, k, r, dtype, quantiles(times_ms), peak_mb, env)
    ROWS.append(row)
    return row
