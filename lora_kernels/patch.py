"""PEFT integration: run PEFT's LoRA `Linear4bit` (bitsandbytes 4-bit base) and `Linear` (dense base) layers
through the fused ops, and undo it.

    report = lora_kernels.patch_peft_model(model)     # print(report) for a summary
    lora_kernels.unpatch_peft_model(model)            # PEFT's own forward again, exactly
    with lora_kernels.patched(model) as report: ...

How: each covered layer gets an instance attribute `forward` (the fast forward below), which shadows the
class's forward; unpatching deletes it. Nothing else on the module changes, so state_dict keys, saving,
loading, set_adapter, merging and deleting adapters are PEFT's own code paths.

What the fast forward computes, per call (so set_adapter / set_scale / train() / eval() are seen):
    y = x W^T + bias + sum_i s_i * (drop(x) A_i^T) B_i^T     over the active adapters i
- one active adapter: the op gets (A, B, s) as they are;
- several: A's concatenated along r and B's concatenated with each B_i pre-multiplied by s_i (torch.cat is
  differentiable, so every adapter gets its gradient), scaling 1. With dropout in training mode they must
  share the dropout probability, and then share one mask (each adapter still sees dropout with the right
  probability; stock PEFT draws an independent mask per adapter). Different probabilities fall back.
- dtypes: a 4-bit base computes in bitsandbytes' compute dtype (or the autocast dtype under autocast) and
  returns x's dtype, as bitsandbytes' Linear4bit does; a dense base computes in its weight's dtype (the
  autocast dtype under autocast). The LoRA term is computed in that same dtype with fp32 accumulation
  (PEFT computes it in the adapter weights' dtype): the difference is within the compute dtype's rounding.

Anything else runs PEFT's own forward, saying why: at patch time in `report.skipped` (layers left alone)
or `report.fallbacks` (patched layers that fall back in their current state), and at run time with one
`lora_kernels.FallbackWarning` per layer and reason. See docs/patching.md.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from .errors import FallbackWarning
from .nf4 import is_cpu_repacked

__all__ = ["PatchReport", "patch_peft_model", "unpatch_peft_model", "patched"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MARK = "_lora_kernels_patched"  # instance attribute on a patched LoRA layer: its kind ("Linear4bit"/"Linear")
_NAME = "_lora_kernels_name"
_WARNED = "_lora_kernels_warned"
_NO_LORA = (None, None, 0.0, 0.0)
_EMPTY = {}


# ------------------------------------------------------------------------------------------ report

@dataclass
class PatchReport:
    """What patch_peft_model did.

    patched:   names of the LoRA layers that now run the fused ops (module names within the patched model).
    skipped:   {name: reason} for LoRA layers left on PEFT's forward.
    fallbacks: {name: reason} for patched layers that, in their current state (merged or disabled adapters,
               an active LoRA variant, bitsandbytes' CPU-repacked weight...), fall back to PEFT's forward at
               run time; they switch to the fused ops by themselves once that state changes.
    kinds:     {name: "Linear4bit" | "Linear"} for the patched layers.
    notes:     what else decides the path at run time (CPU tensors under LORA_KERNELS_BACKEND=auto run PEFT's
               forward, see _cpu_default).
    unpatched: names of layers that an earlier call patched and this call restored to PEFT's forward, because
               a reason in `skipped` applies to them now (a hook added to the base layer since, ...).
    """

    patched: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    fallbacks: dict = field(default_factory=dict)
    kinds: dict = field(default_factory=dict)
    unpatched: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        total = len(self.patched) + len(self.skipped)
        kinds = Counter(self.kinds.get(n, "?") for n in self.patched)
        kind_text = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        lines = [f"lora_kernels: patched {len(self.patched)} of {total} LoRA layers" +
                 (f" ({kind_text})" if kind_text else "")]
        for title, table in (("skipped", self.skipped), ("patched but falling back now", self.fallbacks)):
            if not table:
                continue
            lines.append(f"  {title}: {len(table)}")
            by_reason = defaultdict(list)
            for name, reason in table.items():
                by_reason[reason].append(name)
            for reason, names in by_reason.items():
                more = f" and {len(names) - 1} more" if len(names) > 1 else ""
                lines.append(f"    {len(names)} x {reason} (e.g. {names[0]}{more})")
        lines.extend(f"  note: {note}" for note in self.notes)
        if self.unpatched:
            more = f" and {len(self.unpatched) - 1} more" if len(self.unpatched) > 1 else ""
            lines.append(f"  un-patched now (patched before, skipped for the reason above): {len(self.unpatched)} "
                         f"(e.g. {self.unpatched[0]}{more})")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ layer classes

def _peft_classes():
    """(lora.Linear, lora.bnb.Linear4bit or None, LoraLayer)."""
    from peft.tuners.lora import layer as lora_layer

    linear4bit = None
    try:
        from peft.tuners.lora import bnb as lora_bnb

        linear4bit = getattr(lora_bnb, "Linear4bit", None)
    except ImportError:  # bitsandbytes missing: dense layers only
        pass
    return lora_layer.Linear, linear4bit, lora_layer.LoraLayer


def _bnb_linear4bit():
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


# ------------------------------------------------------------------------------------------ per-call pieces

def _fallback(self, reason, x, args, kwargs):
    """PEFT's own forward, after one FallbackWarning per layer and reason."""
    warned = self.__dict__.get(_WARNED)
    if warned is not None and reason not in warned:
        warned.add(reason)
        name = self.__dict__.get(_NAME, type(self).__name__)
        warnings.warn(f"lora_kernels: {name} runs PEFT's own forward: {reason}", FallbackWarning, stacklevel=3)
    return type(self).forward(self, x, *args, **kwargs)


def _dropout_p(drop):
    """Effective dropout probability of a PEFT lora_dropout module (0 in eval mode), or None if not covered."""
    kind = type(drop)
    if kind is nn.Identity:
        return 0.0
    if kind is nn.Dropout:
        return float(drop.p) if drop.training else 0.0
    return None


def _adapter_reason(self, name):
    """Why adapter `name` of this layer cannot use the fused ops (None when it can)."""
    variants = getattr(self, "lora_variant", _EMPTY)  # PEFT >= 0.15; use_dora covers older versions
    if name in variants:
        return f"adapter {name!r} uses a LoRA variant ({type(variants[name]).__name__})"
    if self.use_dora.get(name, False):
        return f"adapter {name!r} uses DoRA"
    if self.lora_bias.get(name, False):
        return f"adapter {name!r} has lora_bias=True"
    return None


def _module_hooked(module):
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or
                module._backward_pre_hooks or "forward" in module.__dict__)


def _adapter_hooks_reason(self, name):
    """The fused op reads lora_A/lora_B weights directly and never calls those modules or the dropout module:
    a hook or an instance forward on one of them would be skipped."""
    modules = self._modules  # submodules straight from the dict: nn.Module.__getattr__ costs per call
    for part in ("lora_A", "lora_B", "lora_dropout"):
        if _module_hooked(modules[part]._modules[name]):
            return f"adapter {name!r}'s {part} module has hooks or an overridden forward (the fused op would " \
                   "bypass them)"
    return None


def _lora_terms(self):
    """(A, B, scaling, dropout_p) for the active adapters, _NO_LORA without any, or a reason string."""
    modules = self._modules
    lora_A, lora_B, lora_dropout = modules["lora_A"]._modules, modules["lora_B"]._modules, modules["lora_dropout"]._modules
    active = self.active_adapter
    names = [active] if isinstance(active, str) else active
    if len(names) == 1:
        name = names[0]
        if name not in lora_A:
            return _NO_LORA
        reason = _adapter_reason(self, name) or _adapter_hooks_reason(self, name)
        if reason is not None:
            return reason
        p = _dropout_p(lora_dropout[name])
        if p is None or p >= 1.0:
            return f"adapter {name!r} has an unsupported dropout module {lora_dropout[name]!r}"
        return lora_A[name].weight, lora_B[name].weight, self.scaling[name], p
    names = [n for n in names if n in lora_A]
    if not names:
        return _NO_LORA
    a_list, b_list, p_common = [], [], None
    for name in names:
        reason = _adapter_reason(self, name) or _adapter_hooks_reason(self, name)
        if reason is not None:
            return reason
        p = _dropout_p(lora_dropout[name])
        if p is None or p >= 1.0:
            return f"adapter {name!r} has an unsupported dropout module {lora_dropout[name]!r}"
        if p_common is not None and p != p_common:
            return "several active adapters with different dropout probabilities in training mode"
        p_common = p
        a_list.append(lora_A[name].weight)
        b_list.append(lora_B[name].weight * self.scaling[name])
    return torch.cat(a_list, 0), torch.cat(b_list, 1), 1.0, p_common


def _call_reason(args, kwargs):
    if args:
        return "extra positional forward arguments"
    if kwargs.get("adapter_names") is not None:
        return "mixed-batch adapter_names"
    extra = sorted(k for k, v in kwargs.items() if v is not None)
    return f"forward arguments {extra}" if extra else None


def _quant_state(base):
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:  # lost by a parameter conversion (FSDP): bitsandbytes keeps a copy on the module
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(base)
        weight = base.weight
        state = weight.quant_state
    return weight, state


_HOOKED = "the base layer has forward or backward hooks (the fused forward would bypass them)"
_BASE_OVERRIDDEN = "the base layer's forward is overridden (an accelerate offload hook or another patch)"
_GLOBAL_HOOKED = "a global module forward or backward hook is registered (the fused forward would bypass it on " \
                 "the base layer)"


def _hooks_reason(base):
    """Why calling the base layer's own forward directly would skip something PyTorch runs around it: hooks on
    the base layer, global module hooks, or an instance forward (accelerate's offload hook sets one). None when
    nothing would be skipped. Cheap enough to run at every call: a few dict lookups."""
    own = base.__dict__  # accelerate sets _hf_hook there; getattr of a missing one raises inside nn.Module
    if "forward" in own or own.get("_hf_hook") is not None:
        return _BASE_OVERRIDDEN
    if base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks:
        return _HOOKED
    g = _nn_module
    if g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks or \
            g._global_backward_pre_hooks:
        return _GLOBAL_HOOKED
    return None


_REPACKED = ("the 4-bit weight is in bitsandbytes' CPU-repacked layout (made by a no-grad eval forward of "
             "bitsandbytes' Linear4bit on an AVX512-BF16 CPU)")


# ------------------------------------------------------------------------------------------ fast forwards

def _fast_path_terms(self, args, kwargs):
    """The active adapters' (A, B, scaling, dropout p), or the reason this call takes PEFT's own forward."""
    if args or kwargs:
        reason = _call_reason(args, kwargs)
        if reason is not None:
            return reason
    if self._disable_adapters:
        return "adapters are disabled"
    if self.merged_adapters:
        return "adapters are merged into the base weight"
    return _lora_terms(self)


_CPU_NOTE = "on CPU these layers run PEFT's forward (as fast or faster there); LORA_KERNELS_PATCH_CPU=op runs the op"


def _cpu_default(x):
    """True for CPU tensors under LORA_KERNELS_BACKEND=auto: the layer runs PEFT's own forward. Measured (docs/
    patching.md): the op's PyTorch path costs a fixed ~0.2-0.4 ms per layer call (forward + backward), so at small
    shapes it is 1.1-1.4x slower than stock PEFT + bitsandbytes per training step, and bitsandbytes' CPU inference
    kernels (a GEMV at one row, its AVX512 layout) beat it 2-6x per eval call; at the sizes where it wins (a
    512-token step of a hidden-256 Llama: 0.91x at dropout 0, 0.99x at 0.05) the margin is small.
    LORA_KERNELS_PATCH_CPU=op runs the op on CPU (its PyTorch path), as does LORA_KERNELS_BACKEND=reference (with
    the kernels' Philox dropout mask: slower, what the tests compare with)."""
    if not x.is_cpu:
        return False
    env = os.environ
    if "LORA_KERNELS_BACKEND" not in env and "LORA_KERNELS_PATCH_CPU" not in env:
        return True  # both defaults: no parsing on this per-call path (it cost ~3 us of a ~50 us CPU call)
    return _backend_setting() == "auto" and _patch_cpu_setting() == "peft"


def _patch_cpu_setting():
    value = os.environ.get("LORA_KERNELS_PATCH_CPU", "peft").strip().lower() or "peft"
    if value not in ("peft", "op"):
        raise ValueError(f"LORA_KERNELS_PATCH_CPU={value!r} is not 'peft' (default: patched layers on CPU run PEFT's "
                         "forward) or 'op' (they run the fused op's PyTorch path)")
    return value


def _backend_setting():
    from .backend import backend_setting

    return backend_setting()


def _forward_4bit(self, x, *args, **kwargs):
    """Fused forward of a PEFT lora.bnb.Linear4bit layer (see the module docstring)."""
    if _cpu_default(x):
        return type(self).forward(self, x, *args, **kwargs)
    terms = _fast_path_terms(self, args, kwargs)
    if terms.__class__ is str:
        return _fallback(self, terms, x, args, kwargs)
    base = self.base_layer
    hooked = _hooks_reason(base)  # hooks added after patching: PEFT's forward runs them
    if hooked is not None:
        return _fallback(self, hooked, x, args, kwargs)
    weight, state = _quant_state(base)
    if is_cpu_repacked(state):
        return _fallback(self, _REPACKED, x, args, kwargs)
    if not base.compute_type_is_set:  # as bitsandbytes' Linear4bit.forward does on its first call
        base.set_compute_type(x)
        base.compute_type_is_set = True
    in_dtype = x.dtype
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        out_dtype = torch.promote_types(in_dtype, dtype)
    else:
        dtype = base.compute_dtype or in_dtype
        out_dtype = in_dtype
    if dtype not in _DTYPES:
        return _fallback(self, f"compute dtype {dtype} is not bf16, fp16 or fp32", x, args, kwargs)
    a, b, scaling, p = terms
    x = x if in_dtype == dtype else x.to(dtype)  # a same-dtype .to() is still a dispatched op
    y = _ops().qlora_linear(x, weight, state, a, b, scaling, bias=base.bias, dropout_p=p, training=True)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _forward_dense(self, x, *args, **kwargs):
    """Fused forward of a PEFT lora.Linear layer with an nn.Linear base (see the module docstring)."""
    if _cpu_default(x):
        return type(self).forward(self, x, *args, **kwargs)
    terms = _fast_path_terms(self, args, kwargs)
    if terms.__class__ is str:
        return _fallback(self, terms, x, args, kwargs)
    base = self.base_layer
    hooked = _hooks_reason(base)
    if hooked is not None:
        return _fallback(self, hooked, x, args, kwargs)
    weight = base.weight
    if weight.requires_grad:
        return _fallback(self, "the base weight requires grad (the fused op never gives W a gradient)", x, args,
                         kwargs)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        weight = weight.to(dtype)
    elif x.dtype != weight.dtype:
        return _fallback(self, f"input dtype {x.dtype} differs from the base weight's {weight.dtype}", x, args,
                         kwargs)
    a, b, scaling, p = terms
    return _ops().lora_linear(x, weight, a, b, scaling, bias=base.bias, dropout_p=p, training=True)


_OPS = None


def _ops():
    global _OPS
    if _OPS is None:
        from .ops import fused_linear

        _OPS = fused_linear
    return _OPS


# ------------------------------------------------------------------------------------------ patch-time checks

def _static_reason(module, kind):
    """Why this layer can never take the fast path as it stands (None when it can)."""
    if "forward" in module.__dict__ and not _is_ours(module.__dict__["forward"]):
        return "the layer's forward is already overridden by something else"
    base = module.base_layer
    if base is not module.get_base_layer():
        return f"nested adapter layers (base layer is a {type(base).__name__})"
    hooked = _hooks_reason(base)
    if hooked is not None and hooked is not _GLOBAL_HOOKED:  # global hooks may go away: checked per call
        return hooked
    if kind == "Linear4bit":
        bnb_cls = _bnb_linear4bit()
        if bnb_cls is None or not isinstance(base, bnb_cls) or type(base).forward is not bnb_cls.forward:
            return f"base layer {type(base).__name__} is not a bitsandbytes Linear4bit"
        state = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
        if state is None:
            return "the 4-bit weight has no quant_state (not quantized yet?)"
        if getattr(state, "quant_type", None) not in ("nf4", "fp4"):
            return f"unknown 4-bit quant_type {getattr(state, 'quant_type', None)!r}"
    else:
        if type(base) is not nn.Linear:
            return f"base layer {type(base).__name__} is not a plain nn.Linear"
        if getattr(module, "fan_in_fan_out", False):
            return "fan_in_fan_out=True (transposed base weight)"
        if base.weight.dtype not in _DTYPES:
            return f"base weight dtype {base.weight.dtype} is not bf16, fp16 or fp32"
    adapters = list(module.lora_A.keys())
    if not adapters:
        return "the layer has no LoRA adapters"
    reasons = [_adapter_reason(module, a) for a in adapters]
    if all(r is not None for r in reasons):
        return "; ".join(reasons)
    return None


def _current_reason(module, kind):
    """Why the layer would fall back right now (state that changes at run time), or None."""
    if module._disable_adapters:
        return "adapters are disabled"
    if module.merged_adapters:
        return "adapters are merged into the base weight"
    hooked = _hooks_reason(module.base_layer)  # only global hooks get here: the rest are static reasons
    if hooked is not None:
        return hooked
    terms = _lora_terms(module)
    if isinstance(terms, str):
        return terms
    if kind == "Linear4bit":
        if is_cpu_repacked(getattr(module.base_layer.weight, "quant_state", None)):
            return _REPACKED
    elif module.base_layer.weight.requires_grad:
        return "the base weight requires grad (the fused op never gives W a gradient)"
    return None


def _lora_layers(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_peft_model expects a torch.nn.Module (a PEFT model), got {type(model).__name__}")
    linear, linear4bit, lora_layer = _peft_classes()
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, lora_layer):
            continue
        if type(module) is linear:
            kind = "Linear"
        elif linear4bit is not None and type(module) is linear4bit:
            kind = "Linear4bit"
        else:
            kind = None
        found.append((name, module, kind))
    return found


# ------------------------------------------------------------------------------------------ public API

def patch_peft_model(model) -> PatchReport:
    """Makes PEFT's LoRA Linear4bit and Linear layers in `model` run the fused ops. Idempotent.

    Returns a PatchReport (`print(report)` for a summary). Raises ValueError if `model` has no LoRA layers.
    Call it again after adding adapters whose layers were skipped before.
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("no PEFT LoRA layers found in the model: wrap it with peft.get_peft_model(model, "
                         "LoraConfig(...)) first")
    _ops()  # import the kernels now rather than inside the first forward
    report = PatchReport()
    for name, module, kind in layers:
        if kind is None:
            report.skipped[name] = f"{type(module).__module__}.{type(module).__name__} layers are not covered " \
                                   "(only PEFT LoRA Linear and Linear4bit)"
            continue
        reason = _static_reason(module, kind)
        if reason is not None:
            if _unpatch_module(module):  # patched earlier; a reason applies now (a hook added since, ...)
                report.unpatched.append(name)
            report.skipped[name] = reason
            continue
        if _MARK not in module.__dict__:
            fast = _forward_4bit if kind == "Linear4bit" else _forward_dense
            module.__dict__[_NAME] = name
            module.__dict__[_WARNED] = set()
            module.__dict__["forward"] = fast.__get__(module, type(module))
            module.__dict__[_MARK] = kind
        report.patched.append(name)
        report.kinds[name] = kind
        now = _current_reason(module, kind)
        if now is not None:
            report.fallbacks[name] = now
    if any(m.base_layer.weight.device.type == "cpu" for n, m, k in layers if n in report.kinds) and \
            _backend_setting() == "auto" and _patch_cpu_setting() == "peft":
        report.notes.append(_CPU_NOTE)
    return report


def unpatch_peft_model(model) -> list:
    """Restores PEFT's own forward on every layer patch_peft_model patched; returns their names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_peft_model expects a torch.nn.Module, got {type(model).__name__}")
    names = []
    for name, module in model.named_modules():
        if _unpatch_module(module):
            names.append(name)
    return names


def _is_ours(forward) -> bool:
    return getattr(forward, "__func__", None) in (_forward_4bit, _forward_dense)


def _unpatch_module(module) -> bool:
    d = module.__dict__
    if _MARK not in d:
        return False
    if _is_ours(d.get("forward")):  # an instance forward someone set over ours stays theirs
        del d["forward"]
    for key in (_MARK, _NAME, _WARNED):
        d.pop(key, None)
    return True


@contextlib.contextmanager
def patched(model):
    """`with lora_kernels.patched(model) as report:` patches on entry and, on exit, unpatches the layers
    this block patched (layers patched before it stay patched)."""
    before = {id(m) for m in model.modules() if _MARK in m.__dict__} if isinstance(model, nn.Module) else set()
    report = patch_peft_model(model)
    try:
        yield report
    finally:
        for module in model.modules():
            if id(module) not in before:
                _unpatch_module(module)
