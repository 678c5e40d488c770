"""examples/train_qlora.py end to end on CPU: one process, and two processes under torchrun with DDP (gloo on
127.0.0.1). The DDP gradients (averaged over ranks) equal one process's on the same global batch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_qlora.py"
TIMEOUT_S = 240

# fp32 compute so that splitting the batch changes nothing but the order of a few fp32 sums; no dropout, whose
# masks depend on each process's rows.
COMMON = ["--steps", "3", "--seq-len", "32", "--hidden-size", "64", "--layers", "1", "--compute-dtype", "fp32",
          "--lora-dropout", "0", "--lora-r", "8", "--lr", "1e-3", "--log-every", "1", "--backend", "reference"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, tmp_path, nproc=1):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
               "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(SCRIPT), *args]
    else:
        cmd = [sys.executable, str(SCRIPT), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from lora_kernels.demo import BUILTIN_CORPUS

    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    lines = [json.dumps({"text": line}) for line in BUILTIN_CORPUS.splitlines() if line.strip()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_ddp_two_processes_match_one(tmp_path, data_file):
    one = _run([*COMMON, "--batch-size", "4", "--data", str(data_file), "--output", "one",
                "--grads-out", "one.pt"], tmp_path)
    two = _run([*COMMON, "--batch-size", "2", "--data", str(data_file), "--output", "two",
                "--grads-out", "two.pt"], tmp_path, nproc=2)
    for out in (one, two):
        assert "patched 7 of 7 LoRA layers (Linear4bit 7)" in out
        assert "tokens/s" in out and "adapter saved" in out
    assert "2 process(es) x batch 2" in two

    g1, g2 = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert g1.keys() == g2.keys() and len(g1) == 14
    nonzero = 0
    for name in g1:
        if not g1[name].any():  # PEFT initialises B to zero: the first step's A gradients are exactly zero
            assert not g2[name].any(), name
            continue
        nonzero += 1
        err = ((g2[name] - g1[name]).norm() / g1[name].norm()).item()
        assert err < 1e-5, f"{name}: DDP gradient differs from one process's by {err:.2e}"
    assert nonzero == 7

    a1 = load_file(tmp_path / "one" / "adapter_model.safetensors")
    a2 = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a1.keys() == a2.keys()
    for name in a1:  # three AdamW steps later, the adapters are still the same
        torch.testing.assert_close(a2[name], a1[name], rtol=1e-4, atol=1e-6, msg=name)


def test_example_bf16_stock_and_patched_agree(tmp_path):
    """The default recipe (NF4, double quant, bf16 autocast, dropout) patched and stock: same loss curve."""
    args = ["--steps", "5", "--seq-len", "32", "--batch-size", "2", "--hidden-size", "64", "--layers", "1",
            "--log-every", "1", "--lora-dropout", "0"]

    def losses(out):
        return torch.tensor([float(line.split()[3]) for line in out.splitlines() if line.startswith("step")])

    patched = losses(_run([*args, "--output", "p"], tmp_path))
    stock = losses(_run([*args, "--output", "s", "--no-patch"], tmp_path))
    assert len(patched) == len(stock) == 5
    assert ((patched - stock).abs() / stock).max() < 2e-3, (patched, stock)
