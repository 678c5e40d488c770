"""Hooks that PyTorch runs around a module call: a patched layer checks for them at every call (the fused op
would bypass the base layer's and the adapter modules' __call__) and falls back to PEFT's forward, which runs
them; patching again un-patches the layers a hook now applies to and reports them."""
import warnings

import pytest
import torch

import lora_kernels as lk
from lora_kernels import patch as patch_mod
from tests._models import load_peft, lora_layers, save_model, step, token_batch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("llama") / "tiny")


@pytest.fixture(autouse=True)
def _reference(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "reference")


def _fallbacks(record):
    return [str(w.message) for w in record if issubclass(w.category, lk.FallbackWarning)]


def _name_of(pm, layer):
    return next(n for n, m in lora_layers(pm).items() if m is layer)


def _counting_hooks(module):
    calls = {"pre": 0, "post": 0}

    def pre(mod, args):
        calls["pre"] += 1

    def post(mod, args, out):
        calls["post"] += 1

    return calls, module.register_forward_pre_hook(pre), module.register_forward_hook(post)


def test_hook_added_after_patching_runs_and_warns_once(model_dir):
    pm = load_peft(model_dir)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    ids = token_batch()
    report = lk.patch_peft_model(pm)
    assert len(report.patched) == 14
    calls, h_pre, h_post = _counting_hooks(layer.base_layer)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        step(pm, ids)
        step(pm, ids)
        got = layer(x)
    assert calls == {"pre": 3, "post": 3}  # the hooks ran on every call: PEFT's forward took over
    found = _fallbacks(record)
    assert len(found) == 1 and _name_of(pm, layer) in found[0] and "hooks" in found[0]
    lk.unpatch_peft_model(pm)  # the fallback is PEFT's own forward, bit for bit
    assert torch.equal(got, layer(x))
    h_pre.remove()
    h_post.remove()
    lk.patch_peft_model(pm)  # no hook any more: the fused path, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.FallbackWarning)
        step(pm, ids)
    assert calls == {"pre": 4, "post": 4}  # the unpatched call above ran them once more, nothing since


def test_pre_hook_alone_and_dense_layers_fall_back(model_dir):
    pm = load_peft(model_dir, quantized=False, compute_dtype=torch.float32)
    layer = pm.base_model.model.model.layers[1].mlp.down_proj
    lk.patch_peft_model(pm)
    seen = []
    layer.base_layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    with pytest.warns(lk.FallbackWarning, match="down_proj runs PEFT's own forward: the base layer has forward"):
        step(pm, token_batch())
    assert seen == [torch.Size([2, 32, 200])]


def test_backward_hook_on_base_layer_falls_back(model_dir):
    pm = load_peft(model_dir)
    layer = pm.base_model.model.model.layers[0].mlp.up_proj
    lk.patch_peft_model(pm)
    grads = []
    layer.base_layer.register_full_backward_hook(lambda mod, gin, gout: grads.append(gout[0].shape))
    with pytest.warns(lk.FallbackWarning, match="up_proj runs PEFT's own forward"):
        step(pm, token_batch())
    assert grads == [torch.Size([2, 32, 200])]


def test_hook_on_adapter_module_falls_back(model_dir):
    pm = load_peft(model_dir)
    layer = pm.base_model.model.model.layers[0].self_attn.v_proj
    lk.patch_peft_model(pm)
    seen = []
    layer.lora_A["default"].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with pytest.warns(lk.FallbackWarning, match="'default''s lora_A module has hooks"):
        step(pm, token_batch())
    assert seen == [torch.Size([2, 32, 8])]
    report = lk.patch_peft_model(pm)  # a run-time reason: the layer stays patched and is listed as falling back
    assert "lora_A module has hooks" in report.fallbacks[_name_of(pm, layer)] and len(report.fallbacks) == 1


def test_global_module_hook_falls_back_while_registered(model_dir):
    pm = load_peft(model_dir)
    lk.patch_peft_model(pm)
    count = [0]
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: count.__setitem__(0, count[0] + 1))
    try:
        report = lk.patch_peft_model(pm)
        assert len(report.patched) == 14 and len(report.fallbacks) == 14 and not report.skipped
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            step(pm, token_batch())
        assert len(_fallbacks(record)) == 14 and all("global module" in m for m in _fallbacks(record))
        with_hook = count[0]
    finally:
        handle.remove()
    lk.unpatch_peft_model(pm)
    count[0] = 0
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: count.__setitem__(0, count[0] + 1))
    try:
        step(pm, token_batch())
    finally:
        handle.remove()
    assert with_hook == count[0]  # the hook saw every module call that stock PEFT makes
    lk.patch_peft_model(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.FallbackWarning)
        step(pm, token_batch())


def test_repatch_unpatches_a_layer_hooked_since(model_dir):
    """The issue's scenario: patch, add a forward hook to a base layer, patch again. The report lists the layer as
    skipped and un-patched, PEFT's forward is back on it, and the hook runs."""
    pm = load_peft(model_dir)
    layer = pm.base_model.model.model.layers[1].self_attn.o_proj
    name = _name_of(pm, layer)
    assert name in lk.patch_peft_model(pm).patched
    calls, _, _ = _counting_hooks(layer.base_layer)
    report = lk.patch_peft_model(pm)
    assert report.skipped == {name: patch_mod._HOOKED} and report.unpatched == [name]
    assert name not in report.patched and len(report.patched) == 13
    assert "forward" not in layer.__dict__ and patch_mod._MARK not in layer.__dict__
    assert "un-patched now" in str(report) and name in str(report)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.FallbackWarning)  # not patched: no fallback, PEFT's forward itself
        step(pm, token_batch())
    assert calls == {"pre": 1, "post": 1}
    again = lk.patch_peft_model(pm)  # still hooked: skipped, nothing left to un-patch
    assert again.skipped == {name: patch_mod._HOOKED} and again.unpatched == []
    assert name not in lk.unpatch_peft_model(pm) and len(lk.unpatch_peft_model(pm)) == 0


def test_repatch_leaves_a_forward_set_over_ours(model_dir):
    pm = load_peft(model_dir)
    layer = pm.base_model.model.model.layers[0].mlp.gate_proj
    lk.patch_peft_model(pm)
    theirs = lambda x, *a, **k: type(layer).forward(layer, x, *a, **k)  # noqa: E731
    layer.forward = theirs
    report = lk.patch_peft_model(pm)
    name = _name_of(pm, layer)
    assert "already overridden by something else" in report.skipped[name] and report.unpatched == [name]
    assert layer.__dict__["forward"] is theirs and patch_mod._MARK not in layer.__dict__


def test_hook_check_is_cheap(model_dir):
    """The per-call check is a few dict lookups: well under a microsecond or two per layer call."""
    import timeit

    pm = load_peft(model_dir)
    base = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    n = 20000
    per_call = min(timeit.repeat(lambda: patch_mod._hooks_reason(base), number=n, repeat=5)) / n
    assert patch_mod._hooks_reason(base) is None
    assert per_call < 5e-6, per_call
