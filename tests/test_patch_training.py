"""Training with the patched model: activation checkpointing reproduces the gradients (dropout included), and
20 optimizer steps follow stock PEFT's loss curve."""
import warnings

import pytest
import torch

import lora_kernels as lk
from lora_kernels import demo
from tests._models import load_peft, rel_err, save_model, step


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("llama") / "tiny")


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """One layer, for the slower interpreter runs."""
    return save_model(tmp_path_factory.mktemp("llama1") / "tiny", num_layers=1)


@pytest.fixture(autouse=True)
def _strict():
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.FallbackWarning)
        yield


def _checkpointed_step(pm, ids, reentrant):
    inner = pm.base_model.model
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn)
    new_api = hasattr(inner, "activation_checkpointing_enable")
    if reentrant is None:
        (inner.activation_checkpointing_disable if new_api else inner.gradient_checkpointing_disable)()
    else:
        if new_api:
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        inner.enable_input_require_grads()  # what transformers' Trainer and prepare_model_for_kbit_training do
        assert inner.model.layers[0].gradient_checkpointing
    torch.manual_seed(1234)
    return step(pm, ids)


def test_activation_checkpointing_same_gradients(small_dir, backend):
    """Recomputation under transformers' gradient checkpointing (reentrant and not) redraws the same dropout
    seeds from the restored RNG state: the gradients equal those of the run without checkpointing."""
    pm = load_peft(small_dir, lora_dropout=0.1)
    lk.patch_peft_model(pm)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = _checkpointed_step(pm, ids, None)
    for reentrant in (False, True):
        got = _checkpointed_step(pm, ids, reentrant)
        assert torch.equal(got[1], plain[1])
        assert got[2].keys() == plain[2].keys()
        for name in plain[2]:
            torch.testing.assert_close(got[2][name], plain[2][name], rtol=1e-6, atol=1e-9, msg=name)
    if backend == "triton":
        return  # the seed logic is the same for both backends; the interpreter is slow
    # dropout really acted: another seed gives other gradients
    torch.manual_seed(99)
    other = step(pm, ids)
    assert max(rel_err(other[2][n], plain[2][n]) for n in plain[2]) > 1e-2


def _train(model_dir, patch, steps=20, lr=3e-3):
    pm = load_peft(model_dir)
    if patch:
        lk.patch_peft_model(pm)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for ids, labels in demo.token_batches(demo.BUILTIN_CORPUS, seq_len=32, batch_size=2, steps=steps, seed=0):
        opt.zero_grad(set_to_none=True)
        loss = pm(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_twenty_steps_follow_stock_loss_curve(model_dir, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "reference")
    stock = _train(model_dir, patch=False)
    patched = _train(model_dir, patch=True)
    drop = stock[0] - stock[-5:].mean()
    assert drop > 0.3  # it learns
    # bf16 rounding differences compound over the steps; the curves must stay within 0.2% of each other, and
    # within a twentieth of how far the loss moves (measured: 1e-4 relative)
    diff = (patched - stock).abs()
    assert (diff / stock).max() < 2e-3, (stock, patched)
    assert diff.max() < 0.05 * drop
