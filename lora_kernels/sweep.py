"""`lora-kernels sweep [MODEL] [DATA]`: train one LoRA adapter per rank on the same data, seed and steps,
evaluate each on a held-out split, and say which r is best and what is wrong with the others.

    lora-kernels sweep                                   # built-in tiny Llama and corpus, CPU, minutes
    lora-kernels sweep path/to/model data.jsonl --ranks 4 8 16 32 --steps 300 --alpha 2r
    lora-kernels sweep path/to/model notes.txt --targets attention --rslora --alpha 16 --no-patch

Library use:  result = lora_kernels.sweep.run_sweep(model_dir, "data.txt", ranks=(4, 8, 16))

Writes OUT/sweep.csv (one row per rank), OUT/sweep_curves.csv (train and eval loss per step) and
OUT/sweep.png (eval and train loss vs r, trainable parameters, tokens/s, eval curves).

Every rank starts from the same base weights, the same LoRA initialisation seed and the same batches.
On CUDA the base loads in 4 bits (QLoRA) and the PEFT model is patched with lora_kernels' fused kernels
(--no-patch compares with stock PEFT); on CPU it runs in fp32 with PEFT's own forward unless --patch.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field

from .errors import CLIError

DEFAULT_RANKS = (4, 8, 16, 32)
CSV_COLUMNS = ("r", "alpha", "scaling", "rslora", "targets", "trainable_params", "percent_trainable",
               "steps", "train_tokens", "train_loss", "eval_loss", "eval_loss_start", "min_eval_loss",
               "min_eval_step", "tokens_per_s", "train_seconds", "device", "backend", "patched_layers",
               "best", "diagnosis")
CURVE_COLUMNS = ("r", "step", "train_loss", "eval_loss")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def read_text(path: str | os.PathLike) -> str:
    """The training text of a .txt file (all of it) or a .jsonl file (the "text" field of each line,
    documents separated by a blank line). Raises FileNotFoundError/ValueError naming the problem."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"DATA {path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"DATA {path} is a directory; give a .txt or .jsonl file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ValueError(f"cannot read DATA {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot read DATA {path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    if path.lower().endswith((".jsonl", ".ndjson")):
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"DATA {path} line {lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f"DATA {path} line {lineno}: no \"text\" string field")
            if rec["text"].strip():
                docs.append(rec["text"])
        text = "\n\n".join(docs)
    if not text.strip():
        raise ValueError(f"DATA {path} is empty" + (" (no non-empty \"text\" field)"
                                                      if path.lower().endswith((".jsonl", ".ndjson")) else ""))
    return text


def _has_tokenizer(model_dir) -> bool:
    return model_dir is not None and any(os.path.isfile(os.path.join(model_dir, f)) for f in _TOKENIZER_FILES)


def tokenize(text: str, model_dir=None, vocab_size: int = 256):
    """Token ids (a 1-D LongTensor) and the tokenizer's name: the model directory's own tokenizer when
    it has one, else bytes (lora_kernels.demo), which need a vocabulary of at least 256."""
    import torch

    from .demo import BYTE_VOCAB, encode_bytes

    if _has_tokenizer(model_dir):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except Exception as exc:
            raise ValueError(f"cannot load the tokenizer in {model_dir}: {str(exc).strip().splitlines()[0]}") from None
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        name = f"{type(tok).__name__} from {model_dir}"
    else:
        if vocab_size < BYTE_VOCAB:
            raise ValueError(f"the model's vocabulary has {vocab_size} tokens, fewer than the {BYTE_VOCAB} "
                             "byte tokens; put the model's tokenizer files in its directory")
        ids = encode_bytes(text)
        name = "bytes"
    ids = torch.tensor(ids, dtype=torch.long)
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise ValueError(f"token id {int(ids.max())} does not fit the model's vocabulary of {vocab_size}")
    return ids, name


def split_ids(ids, eval_fraction: float, seq_len: int):
    """(train ids, eval ids): the last `eval_fraction` of the token stream is held out."""
    n = ids.numel()
    n_eval = int(n * eval_fraction)
    if n_eval < 2 or n - n_eval < seq_len + 1:
        need = math.ceil(max(2 / eval_fraction, (seq_len + 1) / (1 - eval_fraction)))
        raise ValueError(f"DATA has {n:,d} tokens, too few for seq_len {seq_len} with eval fraction "
                         f"{eval_fraction:g} (needs about {need:,d}); use more text or a smaller --seq-len")
    return ids[: n - n_eval], ids[n - n_eval:]


def train_batches(ids, seq_len: int, batch_size: int, steps: int, seed: int):
    """The same `steps` batches of random windows for every rank (a generator seeded by `seed`)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    hi = ids.numel() - seq_len + 1
    for _ in range(steps):
        starts = torch.randint(0, hi, (batch_size,), generator=gen).tolist()
        yield torch.stack([ids[s:s + seq_len] for s in starts])


def eval_windows(ids, seq_len: int, max_windows: int):
    """Consecutive windows over the held-out ids (the last, shorter one kept if it has 2+ tokens)."""
    windows = [ids[i:i + seq_len] for i in range(0, ids.numel(), seq_len)]
    windows = [w for w in windows if w.numel() >= 2]
    return windows[:max_windows]


# ----------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------

@dataclass
class _ModelSource:
    name: str
    model_dir: str | None  # None: the built-in model
    vocab_size: int
    max_positions: int | None
    config: object = None


def _model_source(model) -> _ModelSource:
    from . import rank
    from .demo import llama_config

    if model is None or (os.fspath(model) == rank.BUILTIN and not os.path.exists(rank.BUILTIN)):
        # Random weights at the usual init (std 0.02) leave the frozen output head unable to express
        # more than a near-uniform distribution, so no adapter could learn; std 0.1 lets loss move.
        cfg = llama_config(initializer_range=0.1)
        return _ModelSource("builtin tiny Llama", None, cfg.vocab_size, cfg.max_position_embeddings, cfg)
    path = os.fspath(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"MODEL {path}: no such file or directory (a local model directory, or "
                                f"'{rank.BUILTIN}')")
    if not os.path.isdir(path):
        hint = (f"; to sweep the built-in model on this data: lora-kernels sweep {rank.BUILTIN} {path}"
                if path.lower().endswith((".txt", ".jsonl", ".ndjson")) else "")
        raise ValueError(f"MODEL {path} is a file; sweep trains the model, so give its directory "
                         f"(config.json and weights){hint}")
    cfg = rank.load_config(path)
    if not any(f.endswith((".safetensors", ".bin", ".pt")) for f in os.listdir(path)):
        raise ValueError(f"MODEL {path} has a config but no weights (*.safetensors or *.bin)")
    vocab = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", None)
    if vocab is None:
        raise ValueError(f"MODEL {path}: its config has no vocab_size; sweep needs a causal language model")
    return _ModelSource(path, path, vocab, getattr(cfg, "max_position_embeddings", None), cfg)


def _load_base(src: _ModelSource, device: str, load_in_4bit: bool, seed: int, tmp_dir=None):
    """A fresh copy of the base model: identical weights on every call."""
    import torch

    from .rank import _quiet_transformers

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with _quiet_transformers():
        return _load_base_quietly(src, device, load_in_4bit, seed, tmp_dir, dtype)


def _load_base_quietly(src, device, load_in_4bit, seed, tmp_dir, dtype):
    from .demo import build_llama, load_4bit

    if src.model_dir is None and not load_in_4bit:
        return build_llama(src.config, seed=seed, dtype=dtype).to(device)
    model_dir = src.model_dir or tmp_dir
    try:
        if load_in_4bit:
            return load_4bit(model_dir, compute_dtype=dtype, device_map={"": 0 if device == "cuda" else "cpu"})
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        return model.to(device)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"cannot load MODEL {src.name}: {str(exc).strip().splitlines()[0]}") from None


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------

@dataclass
class RankResult:
    r: int
    alpha: float
    scaling: float
    trainable_params: int
    percent_trainable: float
    train_loss: float
    eval_loss: float
    eval_loss_start: float
    min_eval_loss: float
    min_eval_step: int
    tokens_per_s: float
    train_seconds: float
    patched_layers: int
    curve: list = field(default_factory=list)  # (step, train_loss, eval_loss or None)
    diagnosis: str = ""


@dataclass
class SweepResult:
    results: list
    best_r: int
    device: str
    backend: str
    csv_path: str
    curves_path: str
    plot_path: str | None
    settings: dict

    def row(self, r: int) -> RankResult:
        return next(x for x in self.results if x.r == r)

    def summary(self) -> str:
        lines = [f"{'r':>4} {'trainable':>11} {'train loss':>10} {'eval loss':>9} {'tokens/s':>9}  diagnosis"]
        for x in self.results:
            lines.append(f"{x.r:>4} {x.trainable_params:>11,d} {x.train_loss:>10.4f} {x.eval_loss:>9.4f} "
                         f"{x.tokens_per_s:>9,.0f}  {x.diagnosis}")
        return "\n".join(lines)


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def _patch(model, want, device):
    """(patch report or None, backend text). want: True, False or None (auto: on CUDA only)."""
    import torch

    if want is False or (want is None and device != "cuda"):
        why = "--no-patch" if want is False else "not patched on CPU by default; --patch to use lora_kernels"
        return None, f"PEFT's own forward ({why})"
    try:
        from .patch import patch_peft_model
    except ImportError as exc:
        if want:
            raise CLIError(f"--patch: lora_kernels.patch is not available ({exc})") from None
        return None, f"PEFT's own forward (lora_kernels.patch is not available: {exc})"
    report = patch_peft_model(model)
    from .backend import backend_setting, interpreting, use_triton

    try:
        triton = use_triton(torch.device(device))
    except RuntimeError as exc:
        raise CLIError(str(exc)) from None
    kind = ("fused Triton kernels" + (" (interpreter)" if device == "cpu" and interpreting() else "")
            if triton else "pure-PyTorch reference ops")
    return report, (f"lora_kernels {kind}, LORA_KERNELS_BACKEND={backend_setting()}: patched "
                    f"{len(report.patched)} of {len(report.patched) + len(report.skipped)} LoRA layers")


def _evaluate(model, windows, batch_size, device):
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            chunk = windows[i:i + batch_size]
            for length in sorted({w.numel() for w in chunk}):  # the short tail window goes alone
                batch = torch.stack([w for w in chunk if w.numel() == length]).to(device)
                loss = model(input_ids=batch, labels=batch).loss.float().item()
                n = batch.shape[0] * (length - 1)
                total += loss * n
                count += n
    model.train()
    return total / count


def diagnose(results: list, rel_tol: float = 0.01) -> int:
    """Sets each result's .diagnosis and returns the best r (lowest final eval loss; ties go to the
    smaller r). Too low: eval loss settles above the best. Too high: train loss keeps falling while eval
    loss rises from its minimum (over-fitting), or more parameters buy no better eval loss."""
    best = min(results, key=lambda x: (round(x.eval_loss, 6), x.r))
    tol = rel_tol * abs(best.eval_loss)
    for x in results:
        evals = [(s, e, t) for s, t, e in x.curve if e is not None and s > 0]
        overfit = None
        if evals:
            s_min, e_min, t_at_min = min(evals, key=lambda v: v[1])
            if x.eval_loss - e_min > tol and x.train_loss < t_at_min:
                overfit = (f"train loss fell {t_at_min:.3f} -> {x.train_loss:.3f} after step {s_min} while "
                           f"eval loss rose {e_min:.3f} -> {x.eval_loss:.3f}")
        gap = x.eval_loss - best.eval_loss
        if x is best:
            text = "best: lowest eval loss"
            if overfit:
                text += f"; but over-fits late ({overfit}): fewer steps or more data"
        elif gap <= tol:
            text = (f"as good as r={best.r} (eval loss within {rel_tol:.0%})"
                    + ("; fewer parameters" if x.r < best.r else "; more parameters for no gain"))
        elif x.r < best.r:
            tail = [e for _, e, _ in evals[len(evals) * 2 // 3:]] if len(evals) >= 3 else []
            still = tail and tail[0] - tail[-1] > tol
            text = (f"too low: eval loss {'is still falling at' if still else 'plateaus at'} "
                    f"{x.eval_loss:.4f}, {gap:.4f} above r={best.r}")
        elif overfit:
            text = f"too high: over-fits ({overfit})"
        else:
            text = f"too high: {x.trainable_params / best.trainable_params:.1f}x the parameters of r={best.r} " \
                   f"and eval loss {gap:.4f} worse"
        x.diagnosis = text
    return best.r


def run_sweep(model=None, data=None, ranks=DEFAULT_RANKS, *, targets="all-linear", alpha="2r",
              rslora: bool = False, steps: int = 120, batch_size: int = 8, seq_len: int = 64,
              lr: float = 2e-3, dropout: float = 0.0, eval_fraction: float = 0.15, eval_every: int | None = None,
              max_eval_windows: int = 64, seed: int = 0, out_dir="lora-sweep", device: str | None = None,
              patch: bool | None = None, load_in_4bit: bool | None = None, plot: bool = True,
              progress: bool = True, log=print) -> SweepResult:
    """Trains one adapter per rank and writes sweep.csv, sweep_curves.csv and sweep.png in out_dir.

    model: None or 'builtin' (lora_kernels.demo's tiny Llama), or a local model directory.
    data: None (the built-in corpus), or a .txt / .jsonl ("text" per line) file.
    targets: a preset (qv, attention, mlp, all-linear), module names, or a regex (see lora_kernels.rank).
    alpha: '2r', 'r' or a number; rslora: scale alpha/sqrt(r) instead of alpha/r.
    patch: True/False, or None to patch on CUDA only. load_in_4bit: None means on CUDA only.
    """
    import torch

    from . import rank
    from .demo import BUILTIN_CORPUS

    # ---- check everything before any training
    ranks = list(ranks)
    if not ranks:
        raise ValueError("no ranks given")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rank r must be a positive integer, got {r!r}")
    ranks = sorted(set(ranks))
    alpha_spec = rank.parse_alpha(alpha)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    if load_in_4bit is None:
        load_in_4bit = device == "cuda"

    src = _model_source(model)
    if src.max_positions and seq_len > src.max_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {src.max_positions}")
    text = BUILTIN_CORPUS if data is None else read_text(data)
    data_name = "built-in corpus" if data is None else os.fspath(data)
    ids, tok_name = tokenize(text, src.model_dir, src.vocab_size)
    train_ids, eval_ids = split_ids(ids, eval_fraction, seq_len)
    windows = eval_windows(eval_ids, seq_len, max_eval_windows)
    eval_every = eval_every or max(1, steps // 10)

    # resolve the targets once, on a meta copy, so a bad name fails before training
    target_names = rank.resolve_targets(rank.as_model(src.config), rank.preset_name(targets) or targets)
    os.makedirs(out_dir, exist_ok=True)

    import tempfile

    from peft import LoraConfig, get_peft_model

    tmp = None
    if src.model_dir is None and load_in_4bit:  # the built-in model goes through a local save, as a user's
        from .demo import save_tiny_llama

        tmp = tempfile.TemporaryDirectory(prefix="lora-sweep-")
        with rank._quiet_transformers():
            save_tiny_llama(tmp.name, src.config, seed=seed)

    log(f"sweep: model {src.name}, data {data_name} ({ids.numel():,d} tokens, {tok_name}; "
        f"{train_ids.numel():,d} train / {eval_ids.numel():,d} held out)")
    log(f"sweep: ranks {', '.join(map(str, ranks))}; targets {targets if isinstance(targets, str) else ','.join(targets)}"
        f" ({len(target_names)} matrices); alpha {alpha_spec}{' with rsLoRA' if rslora else ''}; {steps} steps "
        f"x {batch_size} x {seq_len} tokens, lr {lr:g}, seed {seed}")

    from tqdm.auto import tqdm

    results, backend = [], ""
    warm = min(3, steps - 1)  # steps left out of tokens/s: Triton compiles, caches warm up
    try:
        for i, r in enumerate(ranks):
            a = rank.alpha_for(r, alpha_spec)
            base = _load_base(src, device, load_in_4bit, seed, tmp.name if tmp else None)
            torch.manual_seed(seed)
            cfg = LoraConfig(r=r, lora_alpha=a, target_modules=list(target_names), lora_dropout=dropout,
                             use_rslora=rslora, bias="none", task_type="CAUSAL_LM")
            with warnings.catch_warnings():  # transformers 5 deprecation noise from inside PEFT
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                model_ = get_peft_model(base, cfg)
            trainable, total = model_.get_nb_trainable_parameters()
            report, backend = _patch(model_, patch, device)
            if i == 0:
                log(f"sweep: device {_device_name(device)}, base {'4-bit NF4' if load_in_4bit else 'dense'} "
                    f"{next(p for p in base.parameters()).dtype if not load_in_4bit else ''}".rstrip())
                log(f"sweep: backend {backend}")
                if report is not None and report.skipped:
                    log(str(report))
            params = [p for p in model_.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            warmup = max(1, steps // 20)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
            model_.train()
            curve = [(0, None, _evaluate(model_, windows, batch_size, device))]
            losses, t_train, tokens_timed = [], 0.0, 0
            bar = tqdm(train_batches(train_ids, seq_len, batch_size, steps, seed), total=steps,
                       desc=f"r={r} ({i + 1}/{len(ranks)})", disable=not progress, leave=True, file=sys.stderr)
            for step, batch in enumerate(bar, 1):
                batch = batch.to(device)
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss = model_(input_ids=batch, labels=batch).loss
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                value = loss.item()  # synchronises
                if step > warm:
                    t_train += time.perf_counter() - t0
                    tokens_timed += batch.numel()
                if not math.isfinite(value):
                    raise CLIError(f"r={r}: the loss became {value} at step {step}; lower --lr")
                losses.append(value)
                ev = _evaluate(model_, windows, batch_size, device) if step % eval_every == 0 or step == steps else None
                curve.append((step, value, ev))
                if ev is not None:
                    bar.set_postfix(loss=f"{value:.3f}", eval=f"{ev:.3f}")
            bar.close()
            tail = losses[-max(1, steps // 10):]
            evals = [(s, e) for s, _, e in curve if e is not None and s > 0]
            s_min, e_min = min(evals, key=lambda v: v[1])
            results.append(RankResult(
                r=r, alpha=a, scaling=rank.scaling(r, a, rslora), trainable_params=trainable,
                percent_trainable=100.0 * trainable / total, train_loss=sum(tail) / len(tail),
                eval_loss=curve[-1][2], eval_loss_start=curve[0][2], min_eval_loss=e_min, min_eval_step=s_min,
                tokens_per_s=tokens_timed / t_train if t_train > 0 else float("nan"), train_seconds=t_train,
                patched_layers=len(report.patched) if report is not None else 0, curve=curve))
            del model_, base, opt, params
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        if tmp is not None:
            tmp.cleanup()

    best_r = diagnose(results)
    settings = {"model": src.name, "data": data_name, "targets": targets, "alpha": alpha_spec, "rslora": rslora,
                "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "seed": seed,
                "device": _device_name(device), "backend": backend, "4bit": load_in_4bit}
    csv_path = os.path.join(out_dir, "sweep.csv")
    curves_path = os.path.join(out_dir, "sweep_curves.csv")
    target_text = targets if isinstance(targets, str) else ",".join(targets)
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for x in results:
            w.writerow([x.r, f"{x.alpha:g}", f"{x.scaling:.6g}", rslora, target_text, x.trainable_params,
                        f"{x.percent_trainable:.6f}", steps, steps * batch_size * seq_len, f"{x.train_loss:.6f}",
                        f"{x.eval_loss:.6f}", f"{x.eval_loss_start:.6f}", f"{x.min_eval_loss:.6f}", x.min_eval_step,
                        f"{x.tokens_per_s:.1f}", f"{x.train_seconds:.3f}", _device_name(device), backend,
                        x.patched_layers, x.r == best_r, x.diagnosis])
    with open(curves_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CURVE_COLUMNS)
        for x in results:
            for s, t, e in x.curve:
                w.writerow([x.r, s, "" if t is None else f"{t:.6f}", "" if e is None else f"{e:.6f}"])
    plot_path = None
    if plot:
        plot_path = plot_sweep(results, best_r, os.path.join(out_dir, "sweep.png"), settings, log=log)
    return SweepResult(results=results, best_r=best_r, device=_device_name(device), backend=backend,
                       csv_path=csv_path, curves_path=curves_path, plot_path=plot_path, settings=settings)


def plot_sweep(results, best_r, path, settings, log=print) -> str | None:
    """Eval and train loss vs r, trainable parameters vs r, tokens/s vs r and the eval curves, as a PNG."""
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend and figures alone
    except ImportError:
        log("sweep: matplotlib is not installed, so no plot (pip install 'lora-kernels[plot]'); the CSV has it all")
        return None
    rs = [x.r for x in results]
    fig = Figure(figsize=(11, 8))
    axes = fig.subplots(2, 2)
    ax = axes[0][0]
    ax.plot(rs, [x.eval_loss for x in results], "o-", label="eval loss")
    ax.plot(rs, [x.train_loss for x in results], "s--", label="train loss")
    best = next(x for x in results if x.r == best_r)
    ax.plot([best.r], [best.eval_loss], "*", markersize=16, color="tab:red", label=f"best r={best_r}")
    ax.set_title("loss vs r (end of training)")
    ax.set_ylabel("loss")
    ax.legend()
    ax = axes[0][1]
    for x in results:
        pts = [(s, e) for s, _, e in x.curve if e is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", label=f"r={x.r}")
    ax.set_title("eval loss during training")
    ax.set_xlabel("step")
    ax.legend()
    ax = axes[1][0]
    ax.plot(rs, [x.trainable_params for x in results], "o-", color="tab:green")
    ax.set_yscale("log")
    ax.set_title("trainable parameters vs r")
    ax = axes[1][1]
    ax.plot(rs, [x.tokens_per_s for x in results], "o-", color="tab:purple")
    ax.set_title("training tokens/s vs r")
    ax.set_ylim(bottom=0)
    for ax in (axes[0][0], axes[1][0], axes[1][1]):
        ax.set_xscale("log", base=2)
        ax.set_xticks(rs)
        ax.set_xticklabels([str(r) for r in rs])
        ax.set_xlabel("r")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"LoRA rank sweep: {settings['model']} on {os.path.basename(str(settings['data']))}, "
                 f"{settings['steps']} steps, alpha {settings['alpha']}{' rsLoRA' if settings['rslora'] else ''}\n"
                 f"{settings['device']}; {settings['backend']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help="a local model directory (config.json + weights; its tokenizer is used if present), "
                             "or 'builtin' (default: the built-in tiny Llama)")
    parser.add_argument("data", metavar="DATA", nargs="?", default=None,
                        help="a .txt file, or .jsonl with a \"text\" field per line (default: the built-in corpus)")
    parser.add_argument("--ranks", "-r", type=int, nargs="+", default=list(DEFAULT_RANKS), metavar="R",
                        help="ranks to train (default: %(default)s)")
    parser.add_argument("--targets", "-t", default="all-linear", metavar="SPEC",
                        help="a preset (qv, attention, mlp, all-linear) or comma-separated module names "
                             "(default: %(default)s)")
    parser.add_argument("--alpha", default="2r", metavar="A",
                        help="LoRA alpha: 2r, r, or a number such as 16 (default: %(default)s)")
    parser.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r")
    parser.add_argument("--steps", type=int, default=120, help="training steps per rank (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default: %(default)s)")
    parser.add_argument("--eval-fraction", type=float, default=0.15,
                        help="share of the tokens held out for eval, from the end (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evals (default: steps/10)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, LoRA init and batches")
    parser.add_argument("--out", "-o", default="lora-sweep", help="output directory (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--patch", dest="patch", action="store_true", default=None,
                   help="patch the PEFT model with lora_kernels (default: on CUDA only)")
    g.add_argument("--no-patch", dest="patch", action="store_false", help="stock PEFT forward, to compare")
    q = parser.add_mutually_exclusive_group()
    q.add_argument("--4bit", dest="load_in_4bit", action="store_true", default=None,
                   help="load the base in 4-bit NF4 (default: on CUDA only)")
    q.add_argument("--no-4bit", dest="load_in_4bit", action="store_false", help="dense base weights")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def run(args) -> int:
    from . import rank

    if args.eval_every is not None and args.eval_every < 1:
        raise ValueError(f"--eval-every must be at least 1, got {args.eval_every}")
    targets = rank.parse_targets(args.targets)
    res = run_sweep(args.model, args.data, args.ranks, targets=targets, alpha=args.alpha, rslora=args.rslora,
                    steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                    dropout=args.dropout, eval_fraction=args.eval_fraction, eval_every=args.eval_every,
                    seed=args.seed, out_dir=args.out, device=args.device, patch=args.patch,
                    load_in_4bit=args.load_in_4bit, plot=not args.no_plot, progress=not args.quiet)
    print()
    print(res.summary())
    print()
    print(f"best r = {res.best_r} (lowest eval loss {res.row(res.best_r).eval_loss:.4f}) "
          f"on {res.device}; {res.backend}")
    print(f"wrote {res.csv_path}, {res.curves_path}" + (f", {res.plot_path}" if res.plot_path else ""))
    return 0
