"""The sweep behind `lora-kernels bench`: plans the cases, measures each with a progress bar, appends a CSV
row per measurement as it goes (an interrupted run keeps what it measured), and reports what it skipped.

Order: train_step first (a bounded cost), then layer_fwd, then layer_fwd_bwd; within a layer mode by shape,
M, r, provider. A provider that cannot run a case (an error, out of memory, a path that does not exist on
this device) is skipped with its reason printed; after `time_limit_s` no new case starts, and the cases
left are listed as skipped for that reason.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from . import results
from .presets import LAYER_MODES, BenchSpec
from .providers import Skip

CPU_NOTE = ("CPU run: the lora_kernels rows are what a CPU user gets, not the Triton kernels: lora_kernels[patched] "
            "is the patched PEFT layer, which runs PEFT's forward on CPU by default (LORA_KERNELS_PATCH_CPU=op: "
            "the op's PyTorch reference, lora_kernels[reference]); the baselines are PyTorch/bitsandbytes CPU code, "
            "not cuBLAS. These figures are not kernel figures. Run on a CUDA GPU for those.")


@dataclass
class Task:
    mode: str
    provider: str
    n: int
    k: int
    m: int
    r: int

    def describe(self) -> str:
        if self.mode == "train_step":
            return f"train_step {self.provider} r={self.r}"
        return f"{self.mode} {self.provider} {self.n}x{self.k} M={self.m} r={self.r}"


@dataclass
class BenchResult:
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (task description, reason)
    csv_path: str | None = None
    env: dict = field(default_factory=dict)
    aborted: str | None = None
    seconds: float = 0.0
    train_losses: dict = field(default_factory=dict)  # (train provider, r) -> loss of each step


def plan(spec: BenchSpec) -> list:
    from .providers import ranks_for

    tasks = []
    if "train_step" in spec.modes:
        from .presets import TRAIN_MODELS

        hidden = TRAIN_MODELS[spec.train_model]["hidden_size"]
        for r in spec.train_ranks:
            for p in spec.train_providers():
                tasks.append(Task("train_step", p, hidden, spec.layers, spec.batch_size * spec.seq_len, r))
    for mode in (m for m in LAYER_MODES if m in spec.modes):
        for n, k in spec.shapes:
            for m in spec.ms:
                ranks = sorted(set(spec.ranks) | ({0} if "cublas_bf16" in spec.layer_providers() else set()))
                for r in ranks:
                    for p in spec.layer_providers():
                        if r in ranks_for(p, spec.ranks):
                            tasks.append(Task(mode, p, n, k, m, r))
    return tasks


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _is_oom(exc) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _is_fatal_cuda(exc) -> bool:
    """Errors after which the CUDA context cannot be trusted (later measurements would fail or lie)."""
    text = str(exc).lower()
    return any(s in text for s in ("illegal memory access", "device-side assert", "unspecified launch failure",
                                   "illegal instruction", "misaligned address", "cuda error: an illegal"))


class _Inputs:
    """x and dy shared by the providers of one (mode, shape, M): created once, dropped when the group changes."""

    def __init__(self, spec):
        self.spec, self.key, self.x, self.dy = spec, None, None, None

    def get(self, task):
        from .providers import make_inputs, torch_dtype

        key = (task.mode, task.n, task.k, task.m)
        if key != self.key:
            self.x = self.dy = None
            self.x, self.dy = make_inputs(task.m, task.n, task.k, self.spec.device, torch_dtype(self.spec.dtype),
                                          with_dy=task.mode == "layer_fwd_bwd")
            if task.mode == "layer_fwd_bwd":
                self.x.requires_grad_(True)
            self.key = key
        return self.x, self.dy

    def clear(self):
        self.key = self.x = self.dy = None


def _measure_layer(task, spec, inputs):
    from .providers import build_case
    from .timing import time_cpu, time_cuda

    x, dy = inputs.get(task)
    case = build_case(task.provider, task.mode, task.n, task.k, task.m, task.r, x=x, dy=dy, device=spec.device,
                      dtype=spec.dtype, alpha=spec.alpha)
    try:
        with case.environment():
            if spec.on_cuda:
                t = time_cuda(case.fn, grad_to_none=case.grad_to_none, warmup_ms=spec.warmup_ms,
                              rep_ms=spec.rep_ms, device=spec.device)
            else:
                t = time_cpu(case.fn, grad_to_none=case.grad_to_none, reps=spec.cpu_reps)
    finally:
        case.fn = None
    return case.label, t


# Interleaved CPU layer timing: sub-millisecond calls need many rounds for a stable median on a shared machine.
LAYER_GROUP_MIN_S = 0.3
LAYER_GROUP_MAX_ROUNDS = 200


def _measure_layer_group(tasks, spec, inputs):
    """CPU: the providers of one (mode, shape, M, r) built first, then their calls interleaved (one warm-up call
    each, then rounds of one timed call per provider, in alternating order, for at least `cpu_reps` rounds and
    LAYER_GROUP_MIN_S seconds), so that a busy machine slows them all alike and their ratios mean something.
    {id(task): (label, Timing) or the exception}."""
    from .providers import build_case
    from .timing import Timing, _clear_grads, quantiles

    cases, out = {}, {}
    for task in tasks:
        x, dy = inputs.get(task)
        try:
            cases[id(task)] = build_case(task.provider, task.mode, task.n, task.k, task.m, task.r, x=x, dy=dy,
                                         device=spec.device, dtype=spec.dtype, alpha=spec.alpha)
        except Exception as exc:  # noqa: BLE001 - reported per task by the caller
            out[id(task)] = exc
    times = {k: [] for k in cases}

    def call(k, timed):
        case = cases[k]
        with case.environment():
            _clear_grads(case.grad_to_none)
            t0 = time.perf_counter()
            case.fn()
            if timed:
                times[k].append((time.perf_counter() - t0) * 1e3)

    for k in list(cases):
        try:
            call(k, timed=False)
        except Exception as exc:  # noqa: BLE001 - this provider is reported; the others still run
            out[k] = exc
            del cases[k]
    keys = list(cases)
    start, i = time.perf_counter(), 0
    while keys and (i < spec.cpu_reps or (time.perf_counter() - start < LAYER_GROUP_MIN_S
                                          and i < LAYER_GROUP_MAX_ROUNDS)):
        order = keys if i % 2 == 0 else keys[::-1]
        i += 1
        for k in order:
            if k in out:
                continue
            try:
                call(k, timed=True)
            except Exception as exc:  # noqa: BLE001
                out[k] = exc
    for k in keys:
        if k not in out:
            _clear_grads(cases[k].grad_to_none)
            out[k] = (cases[k].label, Timing(*quantiles(times[k]), None, len(times[k])))
    cases.clear()
    return out


def _measure_train(task, spec, log):
    from . import train_step
    from .timing import time_steps

    step, label, tokens, keep = train_step.build(spec, task.provider, task.r, log=log)
    try:
        t = time_steps(step, device=spec.device, warmup_steps=spec.train_warmup, steps=spec.train_steps)
        losses = [float(v) for v in keep[-1]]  # after timing: reading them synchronizes
    finally:
        del step, keep
    return label, t, losses


def _measure_train_group(tasks, spec, log):
    """CPU: every train_step variant of one r built first, then their steps interleaved (warm-up steps, then
    `train_steps` rounds, one step of each variant per round in alternating order), so that a busy machine slows
    them all alike and the patched/stock ratio means something. {id(task): (label, Timing, losses) or the
    exception it raised}."""
    from . import train_step
    from .timing import Timing, quantiles

    built, out = {}, {}
    for task in tasks:
        try:
            built[id(task)] = train_step.build(spec, task.provider, task.r, log=log)
        except Exception as exc:  # noqa: BLE001 - reported per task by the caller
            out[id(task)] = exc
    keys = list(built)
    times = {k: [] for k in keys}
    try:
        for _ in range(spec.train_warmup):
            for k in keys:
                built[k][0]()
        for i in range(spec.train_steps):
            for k in (keys if i % 2 == 0 else keys[::-1]):
                t0 = time.perf_counter()
                built[k][0]()
                times[k].append((time.perf_counter() - t0) * 1e3)
        for k in keys:
            _, label, _, keep = built[k]
            out[k] = (label, Timing(*quantiles(times[k]), None, len(times[k])), [float(v) for v in keep[-1]])
    except Exception as exc:  # noqa: BLE001 - a failing step fails the group: the timings would not be interleaved
        for k in keys:
            out.setdefault(k, exc)
    finally:
        built.clear()
    return out


def step_ratios(rows) -> dict:
    """{(patched provider, r): patched / stock median step time} for the train_step pairs measured."""
    from .train_step import PARITY_PAIRS

    ms = {}
    for row in rows:
        if row["bench"] == "train_step":
            ms[(row["provider"].split("[", 1)[0], int(row["r"]))] = float(row["ms_p50"])
    return {(p, r): ms[(p, r)] / ms[(PARITY_PAIRS[p], r)] for (p, r) in ms
            if p in PARITY_PAIRS and (PARITY_PAIRS[p], r) in ms and ms[(PARITY_PAIRS[p], r)] > 0}


def run_bench(spec: BenchSpec, *, csv_path=None, progress=True, log=print) -> BenchResult:
    """Runs the sweep `spec` describes; appends rows to `csv_path` (None: no file) as they are measured."""
    import torch

    spec.validate()
    if spec.on_cuda:
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        dev = torch.device(spec.device)
        if dev.index is not None:  # torch 2.11 refuses set_device("cuda") without an index
            torch.cuda.set_device(dev)
    threads = torch.get_num_threads()
    if not spec.on_cuda:
        # One thread: a CPU run checks the harness, and oversubscribed OpenMP threads on a busy machine make small
        # ops 10-100x slower at random, which would break the smoke preset's time bound.
        torch.set_num_threads(1)
    try:
        return _run(spec, csv_path, progress, log)
    finally:
        torch.set_num_threads(threads)


def _run(spec, csv_path, progress, log):
    import warnings

    from .timing import free_memory

    env = results.environment(spec.device)
    res = BenchResult(csv_path=csv_path, env=env)
    if csv_path is not None:
        results.check_writable(csv_path)
    tasks = plan(spec)
    t0 = time.perf_counter()
    inputs = _Inputs(spec)

    from tqdm.auto import tqdm

    # Not a terminal (a log file, a remote job): redraw rarely, so the log keeps the tables, not the bar.
    interactive = bool(getattr(sys.stderr, "isatty", lambda: False)())
    bar = tqdm(tasks, total=len(tasks), unit="case", disable=not progress, dynamic_ncols=True,
               desc="lora-kernels bench", mininterval=0.1 if interactive else 30.0)
    say = (lambda msg: tqdm.write(msg)) if progress else log
    left = []
    group = {}  # CPU train_step: results of the interleaved variants of one r, taken task by task
    layer_group = {}  # CPU layer benches: results of the interleaved providers of one (mode, shape, M, r)
    try:
        for i, task in enumerate(bar):
            if spec.time_limit_s is not None and time.perf_counter() - t0 > spec.time_limit_s:
                left = tasks[i:]
                break
            bar.set_postfix_str(task.describe(), refresh=False)
            if task.mode == "train_step" or (inputs.key is not None and inputs.key[0] != task.mode):
                inputs.clear()
                free_memory(spec.device)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    if task.mode == "train_step" and not spec.on_cuda:
                        if id(task) not in group:
                            group = _measure_train_group([t for t in tasks if t.mode == "train_step" and t.r == task.r],
                                                         spec, say)
                        got = group.pop(id(task))
                        if isinstance(got, BaseException):
                            raise got
                        label, t, res.train_losses[(task.provider, task.r)] = got
                    elif task.mode == "train_step":
                        label, t, res.train_losses[(task.provider, task.r)] = _measure_train(task, spec, say)
                    elif not spec.on_cuda:
                        if id(task) not in layer_group:
                            key = (task.mode, task.n, task.k, task.m, task.r)
                            layer_group = _measure_layer_group(
                                [t for t in tasks if (t.mode, t.n, t.k, t.m, t.r) == key], spec, inputs)
                        got = layer_group.pop(id(task))
                        if isinstance(got, BaseException):
                            raise got
                        label, t = got
                    else:
                        label, t = _measure_layer(task, spec, inputs)
            except Skip as exc:
                res.skipped.append((task.describe(), str(exc)))
                say(f"skip {task.describe()}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - a provider failing is reported, never hides the others
                reason = ("out of memory" if _is_oom(exc) else _short(exc))
                res.skipped.append((task.describe(), reason))
                say(f"skip {task.describe()}: {reason}")
                if spec.on_cuda and _is_fatal_cuda(exc):
                    res.aborted = f"CUDA error in {task.describe()} ({_short(exc)}); the rest of the sweep cannot run"
                    left = tasks[i + 1:]
                    break
                free_memory(spec.device)
                continue
            finally:
                if task.mode == "train_step":
                    free_memory(spec.device)
            row = results.make_row(task.mode, label, task.m, task.n, task.k, task.r, spec.dtype, t.ms,
                                   t.peak_mem_mb, env)
            res.rows.append(row)
            if csv_path is not None:
                results.append_csv(csv_path, [row])
    finally:
        bar.close()
        inputs.clear()
        free_memory(spec.device)
    if left:
        reason = res.aborted or f"time limit of {spec.time_limit_s:g} s reached"
        for task in left:
            res.skipped.append((task.describe(), reason))
        log(f"{reason}: {len(left)} case(s) not run, from {left[0].describe()} on "
            "(narrow the sweep with --shapes/--m/--ranks/--mode, or raise --time-limit)")
    res.seconds = time.perf_counter() - t0
    return res
