"""Choosing the LoRA rank: parameter counts, target-module discovery, presets and starting heuristics.

Everything here works from a config alone: the model is built on the meta device (no weights are
allocated and nothing is downloaded), so counting the adapters of a 70B model takes a second.

    from lora_kernels import rank
    c = rank.count_lora_parameters("path/to/model", r=16, target_modules="attention")
    c.trainable, c.total, c.percent, c.per_module["q_proj"].params_per_matrix
    rank.find_target_modules("path/to/config.json")   # {"q_proj": TargetGroup(...), ...}
    rank.recommend("domain", 20_000)                   # r, alpha, targets and the reasons

A LoRA adapter on a matrix W (out_features x in_features) adds A (r x in) and B (out x r):
r * (in + out) trainable parameters. Counts follow PEFT: `total` is what
`PeftModel.get_nb_trainable_parameters()` reports as "all params" (base parameters, each shared tensor
once, 4-bit weights counted as unpacked elements, plus the adapters) and `percent` is its trainable%.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field

# Target presets, resolved against each model's own module names (see resolve_targets):
#   qv          the query and value projections (the original LoRA paper's choice; a fused qkv
#               projection such as GPT-2's c_attn counts, since it holds both)
#   attention   every linear layer inside an attention block (q, k, v, o)
#   mlp         every other linear layer except the output head (gate, up, down / fc1, fc2 / c_fc)
#   all-linear  attention + mlp: every linear layer but the output head, as PEFT's "all-linear"
TARGET_PRESETS = {
    "qv": "query and value projections (fused qkv layers included)",
    "attention": "all linear layers of the attention blocks (q, k, v, o)",
    "mlp": "all linear layers outside attention, except the output head (gate, up, down)",
    "all-linear": "every linear layer except the output head (PEFT's 'all-linear')",
}
_PRESET_ALIASES = {
    "qv": "qv", "q,v": "qv", "q_v": "qv", "query-value": "qv",
    "attention": "attention", "attn": "attention",
    "mlp": "mlp", "ffn": "mlp", "feed-forward": "mlp",
    "all-linear": "all-linear", "all_linear": "all-linear", "all": "all-linear", "linear": "all-linear",
}
# Leaf names that hold the query or the value projection, alone or fused with the others.
_QUERY_VALUE_NAMES = {
    "q_proj", "v_proj", "query", "value", "q", "v", "wq", "wv", "q_lin", "v_lin",
    "c_attn", "qkv_proj", "qkv", "query_key_value", "wqkv", "w_pack", "in_proj",
}
_ATTENTION_WORDS = ("attn", "attention")

BUILTIN = "builtin"  # MODEL value naming the small built-in Llama of lora_kernels.demo


# ----------------------------------------------------------------------------------------------
# Loading: a model, a config, a config dict, a model directory or a config.json
# ----------------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike):
    """The transformers config of a local model directory or config.json; never touches a hub.

    Raises FileNotFoundError for a missing path and ValueError for anything transformers cannot read,
    each with a one-line message naming the file and the problem.
    """
    from .demo import llama_config

    path = os.fspath(path)
    if path == BUILTIN and not os.path.exists(path):
        return llama_config()
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory (MODEL is a local model directory "
                                f"or its config.json, or '{BUILTIN}')")
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} has no config.json")
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except UnicodeDecodeError:
        raise ValueError(f"cannot read config {file}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"cannot read config {file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise ValueError(f"cannot read config {file}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"cannot read config {file}: expected a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type")
    if not model_type:
        raise ValueError(f"cannot read config {file}: it has no 'model_type' key, so transformers "
                         "cannot tell the architecture")
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        import transformers

        raise ValueError(f"cannot read config {file}: transformers {transformers.__version__} does not know "
                         f"model_type {model_type!r}")
    try:
        with _quiet_transformers():
            if os.path.isdir(path):
                return AutoConfig.from_pretrained(path, local_files_only=True)
            data = dict(data)
            data.pop("model_type")
            return AutoConfig.for_model(model_type, **data)
    except Exception as exc:  # transformers raises many kinds; the user needs one line
        raise ValueError(f"cannot read config {file}: {_first_line(exc)}") from None


def build_meta_model(config):
    """A model of `config`'s architecture on the meta device: shapes and names, no memory, no weights."""
    import torch

    cls = _model_class(config)
    with _quiet_transformers(), torch.device("meta"):
        try:
            return cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
        except Exception as exc:
            raise ValueError(f"cannot build {getattr(cls, '__name__', cls)} from this config: "
                             f"{_first_line(exc)}") from None


def as_model(model_or_config):
    """nn.Module from a module, a PretrainedConfig, a config dict, or a path (directory or config.json)."""
    import torch

    if isinstance(model_or_config, torch.nn.Module):
        if _is_peft_wrapped(model_or_config):
            raise ValueError("the model already has PEFT adapters; pass the base model "
                             "(peft_model.get_base_model() before LoRA was added) or its config")
        return model_or_config
    if isinstance(model_or_config, (str, os.PathLike)):
        return build_meta_model(load_config(model_or_config))
    if isinstance(model_or_config, dict):
        from transformers import AutoConfig

        data = dict(model_or_config)
        model_type = data.pop("model_type", None)
        if not model_type:
            raise ValueError("config dict has no 'model_type' key")
        return build_meta_model(AutoConfig.for_model(model_type, **data))
    from transformers import PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        return build_meta_model(model_or_config)
    raise TypeError(f"expected a model, a transformers config, a config dict or a path; "
                    f"got {type(model_or_config).__name__}")


def _model_class(config):
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    for auto in (AutoModelForCausalLM, AutoModel):
        if type(config) in auto._model_mapping:
            return auto
    raise ValueError(f"transformers has no model class for config {type(config).__name__}")


def _is_peft_wrapped(model) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# ----------------------------------------------------------------------------------------------
# Target-module discovery
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetGroup:
    """Linear layers that share a role, e.g. every layer's q_proj.

    name: the shortest trailing part of the module names that tells this group from the others
    ('q_proj'; 'attn.c_proj' and 'mlp.c_proj' in GPT-2). pattern: the full name with layer indices
    as '*'. shapes: the distinct (in_features, out_features). modules: every full module name.
    is_output_head: the LM head, which PEFT's 'all-linear' leaves out.
    """

    name: str
    pattern: str
    kind: str
    shapes: tuple
    modules: tuple
    is_output_head: bool = False
    in_attention: bool = False

    @property
    def count(self) -> int:
        return len(self.modules)

    def __str__(self) -> str:
        shapes = ", ".join(f"{i}->{o}" for i, o in self.shapes)
        head = "  (output head; not in all-linear)" if self.is_output_head else ""
        return f"{self.name:<16} {self.count:>4} x {self.kind:<11} in->out {shapes}{head}"


def _lora_shape(module):
    """(in, out) of a module LoRA can adapt as a matrix, or None. 4-bit/8-bit layers subclass nn.Linear."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 style layer
        return module.weight.shape[0], module.weight.shape[1]
    return None


def _embedding_shape(module):
    import torch

    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return None


def _output_head_name(model) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    if get is None:
        return None
    try:
        head = get()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def _group_pattern(name: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _short_names(patterns: list[str]) -> dict[str, str]:
    """For each pattern, the shortest dotted suffix (without '*' parts) no other pattern ends with."""
    out = {}
    for pattern in patterns:
        parts = pattern.split(".")
        for k in range(1, len(parts) + 1):
            tail = parts[-k:]
            suffix = ".".join(tail)
            if "*" in tail and k < len(parts):
                continue
            clash = any(o != pattern and (o == suffix or o.endswith("." + suffix)) for o in patterns)
            if not clash:
                out[pattern] = suffix
                break
        else:
            out[pattern] = pattern
    return out


def find_target_modules(model_or_config, *, include_embeddings: bool = False) -> dict[str, TargetGroup]:
    """The layers LoRA can target, grouped by role, in model order: {name: TargetGroup}.

    Linear layers (bitsandbytes 4-bit and 8-bit ones included) and transformers' Conv1D; embeddings
    too with include_embeddings=True. Pass any group's name in target_modules.
    """
    model = as_model(model_or_config)
    head = _output_head_name(model)
    groups: dict[str, dict] = {}
    for name, module in model.named_modules():
        shape = _lora_shape(module)
        kind = type(module).__name__
        if shape is None and include_embeddings:
            shape = _embedding_shape(module)
        if shape is None or not name:
            continue
        g = groups.setdefault(_group_pattern(name), {"kinds": [], "shapes": [], "modules": [], "head": False})
        if kind not in g["kinds"]:
            g["kinds"].append(kind)
        if shape not in g["shapes"]:
            g["shapes"].append(shape)
        g["modules"].append(name)
        g["head"] = g["head"] or name == head
    short = _short_names(list(groups))
    result = {}
    for pattern, g in groups.items():
        parents = pattern.split(".")[:-1]
        in_attn = any(w in p.lower() for p in parents for w in _ATTENTION_WORDS)
        result[short[pattern]] = TargetGroup(
            name=short[pattern], pattern=pattern, kind="/".join(g["kinds"]), shapes=tuple(g["shapes"]),
            modules=tuple(g["modules"]), is_output_head=g["head"], in_attention=in_attn)
    return result


def format_target_modules(groups: dict[str, TargetGroup]) -> str:
    lines = [f"{'name':<16} {'count':>4}   {'type':<11} shapes"]
    lines += [str(g) for g in groups.values()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Resolving target_modules (PEFT's matching rules, plus our presets)
# ----------------------------------------------------------------------------------------------

def preset_name(spec) -> str | None:
    """The canonical preset name for `spec` ('q,v' -> 'qv'), or None if it is not a preset."""
    if isinstance(spec, str):
        return _PRESET_ALIASES.get(spec.strip().lower())
    if isinstance(spec, (list, tuple)) and len(spec) == 1 and isinstance(spec[0], str):
        return _PRESET_ALIASES.get(spec[0].strip().lower())
    return None


def parse_targets(text: str):
    """CLI form: a preset name ('attention') or comma-separated module names ('q_proj,v_proj')."""
    text = text.strip()
    if not text:
        raise ValueError("--targets is empty; give a preset (" + ", ".join(TARGET_PRESETS) + ") or module names")
    if preset_name(text):
        return preset_name(text)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--targets {text!r} names no module")
    return names


def resolve_targets(model, target_modules) -> list[str]:
    """Full names of the modules `target_modules` selects, in model order.

    target_modules: a preset ('qv', 'attention', 'mlp', 'all-linear'); a list of names, each matching a
    module whose full name equals it or ends with '.' + it (PEFT's rule); or any other string, a regex
    that must match the full name (PEFT's rule). Every name and preset must match at least one layer
    LoRA can adapt, or ValueError says which one did not and what the model has.
    """
    groups = find_target_modules(model)
    preset = preset_name(target_modules)
    if preset is not None:
        return _resolve_preset(model, groups, preset)
    if isinstance(target_modules, str):
        try:
            regex = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {exc}") from None
        chosen = [n for n, _ in model.named_modules() if n and regex.fullmatch(n)]
        if not chosen:
            raise ValueError(f"target module regex {target_modules!r} matches no module of "
                             f"{type(model).__name__}; {_available(groups)}")
        _check_adaptable(model, chosen, groups, f"regex {target_modules!r}")
        return chosen
    if target_modules is None:
        raise ValueError("target_modules is required: a preset (" + ", ".join(TARGET_PRESETS) +
                         ") or a list of module names")
    names = list(target_modules)
    if not names:
        raise ValueError("target_modules is empty")
    all_names = [n for n, _ in model.named_modules() if n]
    chosen: list[str] = []
    for target in names:
        if not isinstance(target, str) or not target:
            raise ValueError(f"target module {target!r} is not a module name")
        if preset_name(target):  # a preset inside a list: ['attention', 'lm_head']
            hits = _resolve_preset(model, groups, preset_name(target))
        else:
            hits = [n for n in all_names if n == target or n.endswith("." + target)]
        if not hits:
            raise ValueError(f"target module {target!r} matches no module of {type(model).__name__}; "
                             f"{_available(groups)}")
        _check_adaptable(model, hits, groups, repr(target))
        chosen.extend(hits)
    order = {n: i for i, n in enumerate(all_names)}
    return sorted(set(chosen), key=order.__getitem__)


def _resolve_preset(model, groups, preset) -> list[str]:
    body = [g for g in groups.values() if not g.is_output_head]
    if preset == "all-linear":
        picked = body
    elif preset == "attention":
        picked = [g for g in body if g.in_attention]
    elif preset == "mlp":
        picked = [g for g in body if not g.in_attention]
    else:  # qv
        picked = [g for g in body if g.pattern.rsplit(".", 1)[-1].lower() in _QUERY_VALUE_NAMES]
    names = [m for g in picked for m in g.modules]
    if not names:
        raise ValueError(f"target preset {preset!r} matches no layer of {type(model).__name__}; "
                         f"{_available(groups)}")
    return names


def _check_adaptable(model, hits, groups, what):
    modules = dict(model.named_modules())
    for name in hits:
        mod = modules[name]
        if _lora_shape(mod) is None and _embedding_shape(mod) is None:
            raise ValueError(f"target module {what} matches {name} ({type(mod).__name__}), which is not a "
                             f"linear layer LoRA can adapt; {_available(groups)}")


def _available(groups) -> str:
    names = [g.name for g in groups.values()]
    return ("its linear layers are: " + ", ".join(names) + "; presets: " + ", ".join(TARGET_PRESETS)
            if names else "it has no linear layers")


# ----------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleCount:
    """The adapters of one group of matrices (e.g. every q_proj). shapes: distinct (in, out)."""

    name: str
    matrices: int
    shapes: tuple
    params: int
    per_matrix: tuple  # distinct r * (in + out), ascending

    @property
    def params_per_matrix(self) -> int:
        """r * (in + out); where the group's matrices differ in shape, the largest."""
        return self.per_matrix[-1]


@dataclass(frozen=True)
class LoraCount:
    """What `count_lora_parameters` found. total and percent are PEFT's "all params" and "trainable%"."""

    r: int
    trainable: int
    base: int
    modules: tuple
    per_module: dict = field(default_factory=dict)
    model_class: str = ""

    @property
    def total(self) -> int:
        return self.base + self.trainable

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def matrices(self) -> int:
        return len(self.modules)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                f"trainable%: {self.percent:.4f}")


def _check_r(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    return r


def base_parameter_count(model) -> int:
    """All parameters as PEFT counts them: shared tensors once, a packed 4-bit weight as its elements."""
    total = 0
    for _, p in model.named_parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            size = p.element_size() if hasattr(p, "element_size") else 1
            n *= 2 * size
        total += n
    return total


def count_lora_parameters(model_or_config, r: int = 8, target_modules=("q_proj", "v_proj")) -> LoraCount:
    """Trainable LoRA parameters, r * (in + out) per adapted matrix, and the total, as PEFT counts them.

    model_or_config: an nn.Module (4-bit ones too), a transformers config, a config dict, or a path to a
    local model directory or config.json (built on the meta device: no weights, no download).
    target_modules: a preset (see TARGET_PRESETS), a list of module names, or a regex (PEFT's rules).
    GQA needs no special case: k_proj/v_proj are counted from their real shapes.
    """
    _check_r(r)
    model = as_model(model_or_config)
    names = resolve_targets(model, target_modules)
    groups = find_target_modules(model, include_embeddings=True)
    group_of = {m: g for g in groups.values() for m in g.modules}
    modules = dict(model.named_modules())
    acc: dict[str, dict] = {}
    trainable = 0
    for name in names:
        shape = _lora_shape(modules[name]) or _embedding_shape(modules[name])
        n = r * (shape[0] + shape[1])
        trainable += n
        g = group_of[name].name
        a = acc.setdefault(g, {"matrices": 0, "shapes": [], "params": 0, "per": set()})
        a["matrices"] += 1
        a["params"] += n
        a["per"].add(n)
        if shape not in a["shapes"]:
            a["shapes"].append(shape)
    per_module = {g: ModuleCount(g, a["matrices"], tuple(a["shapes"]), a["params"], tuple(sorted(a["per"])))
                  for g, a in acc.items()}
    return LoraCount(r=r, trainable=trainable, base=base_parameter_count(model), modules=tuple(names),
                     per_module=per_module, model_class=type(model).__name__)


# ----------------------------------------------------------------------------------------------
# Alpha conventions
# ----------------------------------------------------------------------------------------------

def parse_alpha(spec) -> str | float:
    """'2r', 'r', or a number (16 is the third common convention). Returns the spec, validated."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        value = float(spec)
    else:
        text = str(spec).strip().lower().replace(" ", "").replace("*", "")
        if text in ("r", "1r"):
            return "r"
        if text in ("2r", "r2"):
            return "2r"
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"alpha {spec!r} is not '2r', 'r' or a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"alpha must be positive, got {spec!r}")
    return value


def alpha_for(r: int, spec="2r") -> float:
    spec = parse_alpha(spec)
    if spec == "2r":
        return float(2 * r)
    if spec == "r":
        return float(r)
    return float(spec)


def scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """PEFT's scale s of the update: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


# ----------------------------------------------------------------------------------------------
# Heuristics
# ----------------------------------------------------------------------------------------------

# task -> (r low, r high, targets, what it is). Working ranges from practice, not laws.
_TASKS = {
    "style": (4, 8, "attention", "style or format adaptation"),
    "domain": (8, 16, "all-linear", "domain adaptation"),
    "classification": (16, 32, "attention", "a new task such as classification or extraction"),
    "reasoning": (32, 64, "all-linear", "complex reasoning or instruction following"),
    "unknown": (16, 16, "all-linear", "an unspecified task"),
}
_TASK_ALIASES = {
    "style": "style", "format": "style", "tone": "style", "style/format": "style", "formatting": "style",
    "domain": "domain", "domain-adaptation": "domain", "knowledge": "domain",
    "classification": "classification", "classify": "classification", "new-task": "classification",
    "task": "classification", "extraction": "classification", "ner": "classification",
    "reasoning": "reasoning", "instruction": "reasoning", "instructions": "reasoning",
    "instruction-following": "reasoning", "chat": "reasoning", "math": "reasoning", "code": "reasoning",
    "complex": "reasoning",
    "unknown": "unknown", "unsure": "unknown", "general": "unknown", "": "unknown",
}
TASKS = tuple(_TASKS)


@dataclass(frozen=True)
class Recommendation:
    task: str
    r: int
    alpha: float
    target_modules: str
    use_rslora: bool
    r_range: tuple
    reasons: tuple
    count: LoraCount | None = None

    def __str__(self) -> str:
        head = (f"r={self.r}, alpha={self.alpha:g}, targets={self.target_modules}"
                f"{', rsLoRA' if self.use_rslora else ''} (try r in {self.r_range[0]}-{self.r_range[1]})")
        return "\n".join([head] + [f"  - {why}" for why in self.reasons])


def recommend(task: str | None = None, dataset_size: int | None = None, *, model=None) -> Recommendation:
    """A starting r, alpha and target set for `task`, with the reasons. Start here, then sweep.

    task: 'style' (format, tone), 'domain', 'classification' (a new task), 'reasoning' (instruction
    following, chat, code, math), or None/'unknown'. dataset_size: number of training examples.
    model: optional model, config or path; the recommendation then includes its parameter count.
    """
    key = _TASK_ALIASES.get((task or "").strip().lower().replace("_", "-").replace(" ", "-"))
    if key is None:
        raise ValueError(f"unknown task {task!r}; one of: " + ", ".join(TASKS) +
                         " (or aliases such as format, instruction, chat, code)")
    if dataset_size is not None and (isinstance(dataset_size, bool) or not isinstance(dataset_size, int)
                                     or dataset_size < 1):
        raise ValueError(f"dataset_size must be a positive number of examples, got {dataset_size!r}")
    lo, hi, targets, what = _TASKS[key]
    reasons = []
    if key == "unknown":
        reasons.append("no task given: r=16 is the usual safe start; sweep 8-32 around it")
    else:
        reasons.append(f"{what}: r {lo}-{hi} is the working range")
    n = dataset_size
    if n is None:
        r = lo
        reasons.append(f"dataset size unknown: start at the low end (r={r}); raise r only if eval loss plateaus high")
    elif key == "reasoning" and n >= 100_000:
        lo, hi = 64, 128
        r = 128 if n >= 1_000_000 else 64
        reasons.append(f"{n:,d} examples and a complex task: r 64-128 has the data to use the capacity")
    elif n < 10_000:
        r = lo
        reasons.append(f"{n:,d} examples: the low end (r={r}) leaves less room to memorise a small set")
        if n < 1_000:
            reasons.append("under 1,000 examples: watch eval loss for over-fitting; a lower r or fewer "
                           "epochs is the first fix")
    else:
        r = hi
        reasons.append(f"{n:,d} examples: enough data for the high end (r={r})")
    alpha = float(2 * r)
    reasons.append(f"alpha = 2r = {alpha:g} (scale alpha/r = 2); the other conventions are alpha = r "
                   "(scale 1) and a fixed alpha = 16; keep one convention while sweeping r")
    use_rslora = False
    if r >= 64:
        reasons.append("at r >= 64 consider rsLoRA (scale alpha/sqrt(r)), which keeps the update size "
                       "stable as r grows; with it alpha = 16 or alpha = r is common")
    if targets == "all-linear":
        reasons.append("targets all-linear: adding gate/up/down (the MLP) roughly triples the adapter "
                       "and helps tasks that need new knowledge")
    else:
        reasons.append("targets attention (q, k, v, o): enough to change style or learn a narrow task; "
                       "add the MLP (all-linear, about 3x the parameters) if eval loss plateaus")
    count = None
    if model is not None:
        count = count_lora_parameters(model, r=r, target_modules=targets)
        reasons.append(f"on {count.model_class}: {count.trainable:,d} trainable parameters "
                       f"({count.percent:.3f}% of {count.total:,d})")
    reasons.append("then check it: `lora-kernels sweep MODEL DATA --ranks "
                   f"{max(1, r // 2)} {r} {r * 2}` compares eval loss around it on your data")
    return Recommendation(task=key, r=r, alpha=alpha, target_modules=targets, use_rslora=use_rslora,
                          r_range=(lo, hi), reasons=tuple(reasons), count=count)
