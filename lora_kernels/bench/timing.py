"""Timing one benchmark case: median and 20th/80th percentile milliseconds, and peak memory.

CUDA (`time_cuda`), per measurement:
  1. one untimed call (Triton compiles and autotunes here), synchronized;
  2. peak memory: reset the peak counter, one call, synchronize, torch.cuda.max_memory_allocated();
  3. a 256 MiB flush buffer is allocated (H100's L2 is 50 MiB; a 4-bit 4096x4096 weight would otherwise
     stay in L2 between calls), the call is estimated over 5 runs, then warm-up runs (not timed);
  4. each timed run: gradients set to None, the flush buffer zeroed, start event, the call, end event;
     one synchronize at the end; elapsed_time per run. The flush is on the stream before the start event,
     so it is not in the figure.
This is the same protocol as triton.testing.do_bench, written out so that it does not depend on do_bench's
signature in a given Triton release, so that the flush buffer is not counted in peak memory, and so that
gradients are reset outside the timed region.

CPU (`time_cpu`): one untimed call, then `reps` calls timed with time.perf_counter (at least `min_time_s`
in all). No flush and no peak memory (reported as None): CPU figures are not kernel figures.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass

FLUSH_BYTES = 256 * 1024 * 1024


@dataclass
class Timing:
    p50: float
    p20: float
    p80: float
    peak_mem_mb: float | None
    reps: int

    @property
    def ms(self):
        return (self.p50, self.p20, self.p80)


def quantiles(times_ms):
    """(p50, p20, p80) by linear interpolation between order statistics."""
    xs = sorted(float(t) for t in times_ms)
    if not xs:
        raise ValueError("no timings")

    def q(p):
        pos = p * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return q(0.5), q(0.2), q(0.8)


def _clear_grads(tensors):
    for t in tensors:
        t.grad = None


def time_cuda(fn, *, grad_to_none=(), warmup_ms=25.0, rep_ms=100.0, min_reps=10, max_reps=1000,
              device=None) -> Timing:
    import torch

    device = torch.device(device or "cuda")
    with torch.cuda.device(device):
        return _time_cuda(fn, device, grad_to_none, warmup_ms, rep_ms, min_reps, max_reps)


def _time_cuda(fn, device, grad_to_none, warmup_ms, rep_ms, min_reps, max_reps) -> Timing:
    import torch

    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    _clear_grads(grad_to_none)
    fn()
    sync()

    # Peak memory of one call, with nothing of the harness's own allocated beyond the case's tensors.
    _clear_grads(grad_to_none)
    gc.collect()
    sync()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync()
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    _clear_grads(grad_to_none)

    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)
    try:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        est_runs = 5
        total = 0.0
        for _ in range(est_runs):
            _clear_grads(grad_to_none)
            flush.zero_()
            start.record()
            fn()
            end.record()
            sync()
            total += start.elapsed_time(end)
        estimate = max(total / est_runs, 1e-3)
        n_warmup = max(1, int(warmup_ms / estimate))
        n_reps = int(min(max_reps, max(min_reps, rep_ms / estimate)))
        for _ in range(n_warmup):
            _clear_grads(grad_to_none)
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
        sync()
        for i in range(n_reps):
            _clear_grads(grad_to_none)
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        sync()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    finally:
        del flush
        _clear_grads(grad_to_none)
    p50, p20, p80 = quantiles(times)
    return Timing(p50, p20, p80, peak_mb, len(times))


def time_cpu(fn, *, grad_to_none=(), reps=5, min_time_s=0.0, max_reps=50) -> Timing:
    _clear_grads(grad_to_none)
    fn()  # warm-up, not timed
    times = []
    t_begin = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - t_begin < min_time_s and len(times) < max_reps):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    _clear_grads(grad_to_none)
    p50, p20, p80 = quantiles(times)
    return Timing(p50, p20, p80, None, len(times))


def time_steps(step, *, device, warmup_steps, steps) -> Timing:
    """A training step timed step by step (no L2 flush: a step's working set is far larger than L2).

    CUDA: `warmup_steps` untimed steps, then the peak counter is reset and each of `steps` steps is timed
    with events (one synchronize at the end); peak memory is the maximum over the timed steps (weights,
    gradients, optimizer state and activations: what the training run needs). CPU: perf_counter per step."""
    import torch

    on_cuda = str(device).startswith("cuda")
    for _ in range(warmup_steps):
        step()
    if not on_cuda:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return Timing(*quantiles(times), None, len(times))
    dev = torch.device(device)
    with torch.cuda.device(dev):
        return _time_steps_cuda(step, dev, steps)


def _time_steps_cuda(step, dev, steps) -> Timing:
    import torch

    gc.collect()
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    for i in range(steps):
        starts[i].record()
        step()
        ends[i].record()
    torch.cuda.synchronize(dev)
    peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return Timing(*quantiles(times), peak_mb, len(times))


def free_memory(device) -> None:
    """Between cases: drop cycles (PEFT modules hold some) and return cached blocks to the driver."""
    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))
        torch.cuda.empty_cache()
