"""What the fused path does not cover runs PEFT's own forward, and says so: in the PatchReport at patch time, or
with one FallbackWarning per layer and reason at run time. The results are PEFT's, bit for bit."""
import warnings

import pytest
import torch
from peft import LoraConfig

import lora_kernels as lk
from lora_kernels.ops.fused_linear import _draw_seed
from lora_kernels.reference import dropout_keep_mask
from tests._models import TARGETS, load_peft, lora_layers, save_model, scale_b, step, token_batch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("llama") / "tiny", mlp_bias=True)


@pytest.fixture(autouse=True)
def _reference(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "reference")


def no_cpu_repack(model):
    """Stops bitsandbytes repacking CPU weights on eval no-grad forwards (an AVX512-BF16 CPU feature whose
    repacking fails in bitsandbytes 0.50.2 for K % blocksize != 0, e.g. down_proj here), in stock and patched
    runs alike."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def fallback_warnings(record):
    return [w for w in record if issubclass(w.category, lk.FallbackWarning)]


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _same(a, b):
    return torch.equal(a[0], b[0]) and a[2].keys() == b[2].keys() and all(torch.equal(a[2][n], b[2][n]) for n in a[2])


@pytest.mark.parametrize("kwargs,reason", [(dict(use_dora=True), "DoraLinearVariant"),
                                           (dict(lora_bias=True), "lora_bias=True")])
def test_variants_and_lora_bias_are_skipped(model_dir, kwargs, reason):
    pm = load_peft(model_dir, **kwargs)
    ids = token_batch()
    stock = step(pm, ids)
    report = lk.patch_peft_model(pm)
    assert not report.patched and len(report.skipped) == 14
    assert all(reason in r for r in report.skipped.values())
    assert "patched 0 of 14" in str(report) and reason in str(report)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.FallbackWarning)
        assert _same(step(pm, ids), stock)


def test_unsupported_layer_types_are_skipped(model_dir):
    pm = load_peft(model_dir, target_modules=TARGETS + ["embed_tokens"])
    report = lk.patch_peft_model(pm)
    assert len(report.patched) == 14
    [(name, reason)] = report.skipped.items()
    assert name.endswith("embed_tokens") and "Embedding layers are not covered" in reason


def test_disabled_adapters_one_warning_per_layer(model_dir):
    pm = no_cpu_repack(load_peft(model_dir))
    ids = token_batch()
    with pm.disable_adapter():
        stock = step(pm, ids, backward=False)
    lk.patch_peft_model(pm)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pm.disable_adapter():
            first = step(pm, ids, backward=False)
            second = step(pm, ids, backward=False)
    found = fallback_warnings(record)
    assert len(found) == 14 and all("adapters are disabled" in str(w.message) for w in found)
    assert len({str(w.message) for w in found}) == 14  # one per layer, not one per call
    assert _same(first, stock) and _same(second, stock)
    with warnings.catch_warnings():  # enabled again: the fused path, silently
        warnings.simplefilter("error", lk.FallbackWarning)
        step(pm, ids)


def test_merged_adapters_behave_as_peft(model_dir):
    pm = no_cpu_repack(load_peft(model_dir))
    ids = token_batch()
    report = lk.patch_peft_model(pm)
    pm.merge_adapter()
    assert lk.patch_peft_model(pm).fallbacks.keys() == set(report.patched)
    with pytest.warns(lk.FallbackWarning, match="merged"):
        got = step(pm, ids, backward=False)
    lk.unpatch_peft_model(pm)
    assert _same(got, step(pm, ids, backward=False))
    lk.patch_peft_model(pm)
    pm.unmerge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.FallbackWarning)
        step(pm, ids)


def _add_second(pm, **kwargs):
    torch.manual_seed(3)
    pm.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                                        **kwargs))
    scale_b(pm, "second")


def test_mixed_batch_adapter_names(model_dir):
    pm = no_cpu_repack(load_peft(model_dir))
    _add_second(pm)
    pm.eval()
    ids = token_batch()
    names = ["default", "second"]
    stock = _logits(pm, ids, adapter_names=names)
    lk.patch_peft_model(pm)
    with pytest.warns(lk.FallbackWarning, match="mixed-batch adapter_names"):
        got = _logits(pm, ids, adapter_names=names)
    assert torch.equal(got, stock)


def test_inactive_variant_adapter_patches_and_falls_back_when_active(model_dir):
    """A plain adapter beside a DoRA one: the layer is patched; while DoRA is active it falls back."""
    pm = load_peft(model_dir)
    _add_second(pm, use_dora=True)
    report = lk.patch_peft_model(pm)
    assert len(report.patched) == 14 and not report.fallbacks
    ids = token_batch()
    pm.set_adapter("second")
    assert all("DoraLinearVariant" in r for r in lk.patch_peft_model(pm).fallbacks.values())
    with pytest.warns(lk.FallbackWarning, match="'second' uses a LoRA variant"):
        got = step(pm, ids)
    lk.unpatch_peft_model(pm)
    assert _same(got, step(pm, ids))


def test_different_dropout_with_several_active_adapters(model_dir):
    pm = load_peft(model_dir, lora_dropout=0.1)
    _add_second(pm, lora_dropout=0.2)
    pm.base_model.set_adapter(["default", "second"])
    lk.patch_peft_model(pm)
    with pytest.warns(lk.FallbackWarning, match="different dropout probabilities"):
        step(pm, token_batch())
    pm.eval()  # no dropout in eval mode: the fused path again, and PEFT's result
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.FallbackWarning)
        with torch.enable_grad():
            got = pm(input_ids=token_batch()).logits
    lk.unpatch_peft_model(pm)
    no_cpu_repack(pm)
    want = pm(input_ids=token_batch()).logits
    assert (got.float() - want.float()).norm() / want.float().norm() < 0.02


@pytest.mark.skipif(not __import__("bitsandbytes.nn.modules", fromlist=["has_avx512bf16"]).has_avx512bf16(),
                    reason="bitsandbytes repacks CPU weights only on AVX512-BF16 CPUs")
def test_cpu_repacked_weights_fall_back(model_dir):
    pm = load_peft(model_dir)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj  # K = 64: bitsandbytes can repack it
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    pm.eval()
    with torch.no_grad():
        want = layer(x)  # stock PEFT: bitsandbytes repacks the weight in place here
    assert lk.nf4.is_cpu_repacked(layer.base_layer.weight.quant_state)
    report = lk.patch_peft_model(pm)
    name = next(n for n, m in lora_layers(pm).items() if m is layer)
    assert name in report.patched and "CPU-repacked" in report.fallbacks[name] and len(report.fallbacks) == 1
    with pytest.warns(lk.FallbackWarning, match="CPU-repacked"):
        with torch.no_grad():
            got = layer(x)
    assert torch.equal(got, want)
    pm.state_dict()  # bitsandbytes restores the standard layout when saving: the fused path takes over again
    assert not lk.nf4.is_cpu_repacked(layer.base_layer.weight.quant_state)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.FallbackWarning)
        with torch.no_grad():
            fast = layer(x)
    assert (fast.float() - want.float()).norm() / want.float().norm() < 0.01


def test_dropout_in_the_fused_path(model_dir):
    """Dropout > 0 runs inside the op: the layer output is base + s * (drop(x) A^T) B^T with the op's mask."""
    pm = load_peft(model_dir, lora_dropout=0.25)
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    lk.patch_peft_model(pm)
    x = torch.randn(2, 8, 200, dtype=torch.bfloat16)
    torch.manual_seed(9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.FallbackWarning)
        got = layer(x)
    torch.manual_seed(9)
    seed = int(_draw_seed(0.25, True, layer.lora_A["default"].weight)[1])
    keep = dropout_keep_mask(seed, 16, 200, 0.25).reshape(2, 8, 200)
    xd = torch.where(keep, x.double() / 0.75, torch.zeros((), dtype=torch.float64))
    w = lk.dequantize_4bit(layer.base_layer.weight, layer.base_layer.weight.quant_state).double()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    want = x.double() @ w.t() + layer.base_layer.bias.double() + layer.scaling["default"] * (xd @ a.t()) @ b.t()
    no_drop = x.double() @ w.t() + layer.base_layer.bias.double() + layer.scaling["default"] * (x.double() @ a.t()) @ b.t()
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 2**-7, err
    assert ((no_drop - want).norm() / want.norm()).item() > 10 * err  # dropout really acted
    pm.eval()
    with torch.no_grad():
        ev = layer(x)
    assert ((ev.double() - no_drop).norm() / no_drop.norm()).item() < 2**-7
