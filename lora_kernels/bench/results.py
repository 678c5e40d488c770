"""The benchmark CSV: its columns (DESIGN.md), the environment stamp on every row, appending and reading.

    bench,provider,m,n,k,r,dtype,ms_p50,ms_p20,ms_p80,peak_mem_mb,gpu,torch,triton,commit,date

bench:    layer_fwd | layer_fwd_bwd | train_step
provider: what ran (lora_kernels, lora_kernels[reference] when the PyTorch reference ran instead of the
          Triton kernels, peft_bnb, dequant_cublas, cublas_bf16, peft_bf16, ...)
m, n, k:  layer benches: x is [m, k], the weight [n, k] (n = out_features). train_step: m = tokens per
          step (batch x seq), n = hidden size, k = number of decoder layers.
r:        LoRA rank; 0 = the base layer alone.
ms_*:     median, 20th and 80th percentile milliseconds per call (per optimizer step for train_step).
peak_mem_mb: torch.cuda.max_memory_allocated during one call, MiB (empty on CPU: not measured).
gpu:      torch.cuda.get_device_name(), or "cpu".  date: UTC start of the run, ISO 8601 (one per run).
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import re
import subprocess
import tempfile

COLUMNS = ("bench", "provider", "m", "n", "k", "r", "dtype", "ms_p50", "ms_p20", "ms_p80", "peak_mem_mb",
           "gpu", "torch", "triton", "commit", "date")
BENCHES = ("layer_fwd", "layer_fwd_bwd", "train_step")
_INT_COLUMNS = ("m", "n", "k", "r")
_FLOAT_COLUMNS = ("ms_p50", "ms_p20", "ms_p80", "peak_mem_mb")
RESULTS_DIR = os.path.join("benchmarks", "results")


def gpu_name(device: str) -> str:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def git_commit() -> str:
    """$LORA_KERNELS_COMMIT if set (for copies of the tree without .git, e.g. on a remote GPU machine); else the
    package's git commit (12 hex digits, '+dirty' when lora_kernels/ has uncommitted changes); else the version."""
    from .. import __version__

    forced = os.environ.get("LORA_KERNELS_COMMIT", "").strip()
    if forced:
        return forced

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return f"v{__version__}"
        dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--", "lora_kernels"],
                               capture_output=True, timeout=10).returncode != 0
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"v{__version__}"


def environment(device: str) -> dict:
    """The columns every row of one run shares: gpu, torch, triton, commit, date."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    return {"gpu": gpu_name(device), "torch": torch.__version__.split("+")[0], "triton": triton_version,
            "commit": git_commit(), "date": now.strftime("%Y-%m-%dT%H:%M:%SZ")}


def default_csv_path(env: dict) -> str:
    """GPU: benchmarks/results/<gpu-slug>-<YYYY-MM-DD>.csv under the current directory (the place results are
    committed). CPU: <tmp>/lora-kernels-bench/cpu-<YYYY-MM-DD>.csv, so CPU figures never land among them."""
    day = env["date"][:10]
    if env["gpu"] == "cpu":
        return os.path.join(tempfile.gettempdir(), "lora-kernels-bench", f"cpu-{day}.csv")
    return os.path.join(RESULTS_DIR, f"{slug(env['gpu'])}-{day}.csv")


def make_row(bench, provider, m, n, k, r, dtype, ms, peak_mem_mb, env) -> dict:
    """One CSV row. `ms` = (p50, p20, p80)."""
    p50, p20, p80 = ms
    return {"bench": bench, "provider": provider, "m": int(m), "n": int(n), "k": int(k), "r": int(r),
            "dtype": dtype, "ms_p50": float(p50), "ms_p20": float(p20), "ms_p80": float(p80),
            "peak_mem_mb": None if peak_mem_mb is None else float(peak_mem_mb), **env}


def _format(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def check_writable(path: str) -> None:
    """Raises ValueError naming the problem if rows cannot be appended to `path` (checked before a run)."""
    if os.path.isdir(path):
        raise ValueError(f"--csv {path} is a directory; give a file name such as {os.path.join(path, 'bench.csv')}")
    if os.path.exists(path):
        _check_header(path)
        if not os.access(path, os.W_OK):
            raise ValueError(f"--csv {path} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise ValueError(f"--csv {path}: cannot create it ({existing} is not a writable directory)")


def _check_header(path: str) -> None:
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), None)
    if header is not None and tuple(header) != COLUMNS:
        raise ValueError(f"{path} has columns {','.join(header)}; expected {','.join(COLUMNS)} "
                         "(write to a new file with --csv)")


def append_csv(path: str, rows) -> str:
    """Appends rows (dicts with the COLUMNS keys) to `path`, writing the header if the file is new or empty."""
    rows = list(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        _check_header(path)
    with open(path, "a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(COLUMNS)
        for row in rows:
            missing = [c for c in COLUMNS if c not in row]
            if missing:
                raise KeyError(f"row lacks columns {missing}")
            writer.writerow([_format(row[c]) for c in COLUMNS])
    return path


def read_csv(path: str) -> list[dict]:
    """The rows of a benchmark CSV, with numbers parsed. Raises FileNotFoundError/ValueError naming the problem."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a benchmark CSV")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or tuple(reader.fieldnames) != COLUMNS:
            raise ValueError(f"{path} is not a lora-kernels bench CSV: columns {reader.fieldnames}, "
                             f"expected {','.join(COLUMNS)}")
        rows = []
        for lineno, raw in enumerate(reader, 2):
            try:
                row = dict(raw)
                for c in _INT_COLUMNS:
                    row[c] = int(row[c])
                for c in _FLOAT_COLUMNS:
                    row[c] = float(row[c]) if row[c] not in ("", None) else None
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path} line {lineno}: {exc}") from None
            rows.append(row)
    return rows


PREDICTED_SUFFIX = "_predicted"


def is_predicted(row: dict) -> bool:
    """A row of the static cost model (benchmarks/static_model.py: provider '<name>_predicted', gpu '<device>
    (static model, predicted)'): a prediction, never to be read as a measurement."""
    return str(row.get("provider", "")).endswith(PREDICTED_SUFFIX) or "predicted" in str(row.get("gpu", "")).lower()


def measured(rows: list[dict]) -> list[dict]:
    """The rows that are measurements: predicted rows dropped."""
    return [r for r in rows if not is_predicted(r)]


def base_provider(label: str) -> str:
    """'lora_kernels[reference]' -> 'lora_kernels': the provider without the note on what backend ran."""
    return label.split("[", 1)[0]


def latest(rows: list[dict]) -> list[dict]:
    """One row per (bench, provider, gpu, m, n, k, r, dtype): the last one in file order, so a CSV that several
    runs appended to (e.g. a full sweep split by shape) reads as the newest measurement of each point."""
    keep = {}
    for row in rows:
        keep[(row["bench"], row["provider"], row["gpu"], row["m"], row["n"], row["k"], row["r"], row["dtype"])] = row
    return list(keep.values())
