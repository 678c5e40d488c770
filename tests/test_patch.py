"""patch_peft_model on a tiny Llama loaded through transformers + BitsAndBytesConfig (NF4, double quant, bf16
compute) and wrapped by PEFT: the patched model against stock PEFT and an fp32 oracle, both backends.

Tolerance: the patched model's error against the fp32 oracle (same 4-bit weights and adapters, computed in fp32)
may be at most a small multiple of stock PEFT's own bf16 error against it, per tensor in the Frobenius norm.
"""
import pytest
import torch

import lora_kernels as lk
from lora_kernels.ops.common import INTERPRETED
from tests._models import (assert_as_close_as_stock, fp32_oracle, lora_layers, load_peft, rel_err, save_model,
                           scale_b, step, to_fp32, token_batch)

pytestmark = pytest.mark.filterwarnings("error::lora_kernels.FallbackWarning")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Biases on attention and MLP projections: the base-layer bias goes through the fused epilogue."""
    return save_model(tmp_path_factory.mktemp("llama") / "tiny", attention_bias=True, mlp_bias=True)


def _factor(backend):
    # The interpreter rounds fp32 -> bf16 by truncation where bitsandbytes and CUDA round to nearest (DESIGN.md):
    # about twice the rounding error in every stored bf16 value, so a little more room there.
    return 3.0 if backend == "triton" and INTERPRETED else 2.0


def _compare(got, stock, oracle, factor, floor=2e-3):
    """Logits, loss and every LoRA gradient of `got` against the oracle, bounded by stock PEFT's error."""
    (l1, loss1, g1), (l0, loss0, g0), (lo, losso, go) = got, stock, oracle
    assert set(g1) == set(g0) == set(go) and g1
    assert_as_close_as_stock(l1, l0, lo, factor=factor, floor=floor, what="logits")
    assert_as_close_as_stock(loss1.reshape(1), loss0.reshape(1), losso.reshape(1), factor=factor, floor=floor,
                             what="loss")
    worst = 0.0
    for name in go:
        err, stock_err = assert_as_close_as_stock(g1[name], g0[name], go[name], factor=factor, floor=floor,
                                                  what=name)
        worst = max(worst, err / stock_err)
    print(f"worst gradient error / stock PEFT's: {worst:.2f}")
    return worst


def test_patched_matches_stock_peft(model_dir, backend):
    pm = load_peft(model_dir)
    oracle = fp32_oracle(model_dir, pm)
    ids = token_batch()
    ref = step(oracle, ids)
    stock = step(pm, ids)
    report = lk.patch_peft_model(pm)
    assert len(report.patched) == 14 and not report.skipped and not report.fallbacks
    assert set(report.kinds.values()) == {"Linear4bit"}
    got = step(pm, ids)
    assert got[0].dtype == torch.float32 and got[1].shape == ()
    _compare(got, stock, ref, _factor(backend))
    lk.unpatch_peft_model(pm)


def test_report_unpatch_and_context_manager(model_dir):
    pm = load_peft(model_dir)
    ids = token_batch()
    stock = step(pm, ids)
    layers = lora_layers(pm)
    report = lk.patch_peft_model(pm)
    assert sorted(report.patched) == sorted(layers)
    text = str(report)
    assert text.startswith("lora_kernels: patched 14 of 14 LoRA layers (Linear4bit 14)") and len(text) < 200
    assert all("forward" in m.__dict__ for m in layers.values())
    again = lk.patch_peft_model(pm)  # idempotent
    assert again.patched == report.patched
    names = lk.unpatch_peft_model(pm)
    assert sorted(names) == sorted(layers)
    assert not any("forward" in m.__dict__ or any(k.startswith("_lora_kernels") for k in m.__dict__)
                   for m in layers.values())
    after = step(pm, ids)  # PEFT's own forward again: bit for bit
    assert torch.equal(after[0], stock[0]) and all(torch.equal(after[2][n], stock[2][n]) for n in stock[2])
    with lk.patched(pm) as report2:
        assert len(report2.patched) == 14
        assert all(m.forward.__func__ is not type(m).forward for m in layers.values())
    assert not any("forward" in m.__dict__ for m in layers.values())
    # a layer patched before the block stays patched after it
    lk.patch_peft_model(pm)
    with lk.patched(pm):
        pass
    assert all("forward" in m.__dict__ for m in layers.values())
    lk.unpatch_peft_model(pm)


def test_no_lora_layers_is_an_error():
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        lk.patch_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(TypeError):
        lk.patch_peft_model("model")


def _scale_half(model):
    for layer in lora_layers(model).values():
        layer.set_scale("default", 0.5)


def _two_adapters(model):
    from peft import LoraConfig

    from tests._models import TARGETS

    torch.manual_seed(5)
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    scale_b(model, "second")
    model.base_model.set_adapter(["default", "second"])
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)


VARIANTS = {
    "rslora": (dict(use_rslora=True, r=4, lora_alpha=8), None, False),
    "bf16-adapters": (dict(adapter_dtype=torch.bfloat16), None, False),
    "set-scale": ({}, _scale_half, False),
    "two-adapters": ({}, _two_adapters, False),
    "autocast": ({}, None, True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_path_coverage(model_dir, monkeypatch, variant):
    """rsLoRA, bf16 adapter weights, set_scale and a second active adapter added after patching, autocast: each
    runs the fused op (a FallbackWarning is an error here) and stays within the bound of stock PEFT."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "reference")
    lora_kwargs, mutate, autocast = VARIANTS[variant]
    pm = load_peft(model_dir, **lora_kwargs)
    report = lk.patch_peft_model(pm)
    assert not report.skipped and not report.fallbacks
    if mutate is not None:
        mutate(pm)  # after patching: the patched forward reads adapters and scalings at each call
    ids = token_batch(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = step(pm, ids)
        lk.unpatch_peft_model(pm)
        stock = step(pm, ids)
    oracle = load_peft(model_dir, **lora_kwargs)
    if mutate is not None:
        mutate(oracle)
    ref = step(to_fp32(oracle, pm), ids)
    _compare(got, stock, ref, 2.0)


def test_dense_base_layers(model_dir, backend):
    """PEFT LoRA Linear on nn.Linear bases (an unquantized bf16 model), against stock PEFT and fp32."""
    pm = load_peft(model_dir, quantized=False)
    oracle = load_peft(model_dir, quantized=False, compute_dtype=torch.float32)
    oracle.load_state_dict({k: v.float() for k, v in pm.state_dict().items()})
    ids = token_batch(2)
    ref, stock = step(oracle, ids), step(pm, ids)
    report = lk.patch_peft_model(pm)
    assert len(report.patched) == 14 and set(report.kinds.values()) == {"Linear"}
    _compare(step(pm, ids), stock, ref, _factor(backend))


def test_dense_fp32_is_tight(model_dir):
    """In fp32 the patched and stock dense models agree to fp32 rounding."""
    pm = load_peft(model_dir, quantized=False, compute_dtype=torch.float32)
    ids = token_batch(3)
    stock = step(pm, ids)
    lk.patch_peft_model(pm)
    got = step(pm, ids)
    assert rel_err(got[0], stock[0]) < 1e-5
    assert max(rel_err(got[2][n], stock[2][n]) for n in stock[2]) < 1e-4


def test_fsdp_quant_storage_layers(model_dir, backend):
    """Layer by layer, both backends: a bf16 quant_storage weight gives the uint8 weight's output and gradients."""
    plain, fsdp = load_peft(model_dir), load_peft(model_dir, quant_storage=torch.bfloat16)
    lk.patch_peft_model(plain)
    lk.patch_peft_model(fsdp)
    for attr in ("self_attn.q_proj", "mlp.down_proj"):
        layers = [m.get_submodule(f"base_model.model.model.layers.1.{attr}") for m in (plain, fsdp)]
        assert layers[1].base_layer.weight.dtype == torch.bfloat16
        x = torch.randn(2, 5, layers[0].in_features, generator=torch.Generator().manual_seed(5))
        outs = []
        for layer in layers:
            xi = x.to(torch.bfloat16).requires_grad_()
            y = layer(xi)
            y.float().square().sum().backward()
            outs.append((y, xi.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad))
        assert all(torch.equal(a, b) for a, b in zip(*outs)), attr


def test_fsdp_quant_storage_reads_the_same_weights(model_dir):
    """bnb_4bit_quant_storage=torch.bfloat16 (the FSDP layout) holds the same bytes: identical results."""
    ids = token_batch(4)
    plain = load_peft(model_dir)
    lk.patch_peft_model(plain)
    want = step(plain, ids)
    pm = load_peft(model_dir, quant_storage=torch.bfloat16)
    weight = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert weight.dtype == torch.bfloat16
    report = lk.patch_peft_model(pm)
    assert len(report.patched) == 14 and not report.skipped
    got = step(pm, ids)
    assert torch.equal(got[0], want[0]) and all(torch.equal(got[2][n], want[2][n]) for n in want[2])
