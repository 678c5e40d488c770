"""While patched, PEFT's state handling is untouched: state_dict keys, save_pretrained, from_pretrained,
load_adapter / set_adapter / delete_adapter, merge_and_unload; unpatching restores PEFT's forward."""
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lora_kernels as lk
from lora_kernels import demo
from tests._models import load_peft, lora_layers, save_model, step, token_batch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("llama") / "tiny")


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.FallbackWarning)
        yield


def test_state_dict_and_save_load_round_trip(model_dir, tmp_path):
    from peft import PeftModel

    pm = load_peft(model_dir)
    ids = token_batch()
    before = pm.state_dict()
    lk.patch_peft_model(pm)
    after = pm.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    want = step(pm, ids)

    pm.save_pretrained(tmp_path / "patched")
    lk.unpatch_peft_model(pm)
    pm.save_pretrained(tmp_path / "stock")
    saved, stock_saved = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("patched", "stock"))
    assert saved.keys() == stock_saved.keys() and all(torch.equal(saved[k], stock_saved[k]) for k in saved)

    fresh = PeftModel.from_pretrained(demo.load_4bit(model_dir), str(tmp_path / "patched"), is_trainable=True)
    fresh.train()
    report = lk.patch_peft_model(fresh)
    assert len(report.patched) == 14
    got = step(fresh, ids)
    assert torch.equal(got[0], want[0]) and all(torch.equal(got[2][n], want[2][n]) for n in want[2])


def test_load_set_delete_adapter_while_patched(model_dir, tmp_path):
    pm = load_peft(model_dir)
    ids = token_batch(1)
    pm.save_pretrained(tmp_path / "a")
    lk.patch_peft_model(pm)
    want = step(pm, ids)
    with torch.no_grad():  # make "default" differ from the saved copy
        for name, p in pm.named_parameters():
            if ".lora_B.default" in name:
                p.mul_(2.0)
    changed = step(pm, ids)
    assert not torch.equal(changed[0], want[0])
    pm.load_adapter(str(tmp_path / "a"), adapter_name="loaded", is_trainable=True)
    pm.set_adapter("loaded")
    got = step(pm, ids)  # the loaded adapter, through the fused path (a fallback would raise here)
    assert torch.equal(got[0], want[0])
    assert all(".loaded." in n for n in got[2]) and len(got[2]) == 28
    pm.set_adapter("default")
    pm.delete_adapter("loaded")
    assert all("loaded" not in layer.lora_A for layer in lora_layers(pm).values())
    assert torch.equal(step(pm, ids)[0], changed[0])


def test_merge_and_unload_while_patched(model_dir):
    ids = token_batch(2)
    stock = load_peft(model_dir)
    patched = load_peft(model_dir)
    lk.patch_peft_model(patched)
    merged_stock = stock.merge_and_unload()
    merged = patched.merge_and_unload()
    assert not lora_layers(merged)
    assert not any("forward" in m.__dict__ for m in merged.modules())
    merged.train()
    merged_stock.train()
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, merged_stock(input_ids=ids).logits)


def test_unpatch_then_repatch_mid_training(model_dir):
    """Patch state does not leak into autograd: a step patched, unpatched, patched again agrees with stock."""
    pm = load_peft(model_dir)
    ids = token_batch(3)
    stock = step(pm, ids)
    for _ in range(2):
        lk.patch_peft_model(pm)
        got = step(pm, ids)
        assert (got[0] - stock[0]).norm() / stock[0].norm() < 0.02
        lk.unpatch_peft_model(pm)
        again = step(pm, ids)
        assert torch.equal(again[0], stock[0])
