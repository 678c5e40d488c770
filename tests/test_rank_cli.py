"""`lora-kernels params`: the tables, formats and one-line errors, through the real dispatcher."""
import csv
import io
import json
import os
import subprocess
import sys

import pytest

from lora_kernels import cli, rank

transformers = pytest.importorskip("transformers")


@pytest.fixture
def main():
    return cli.main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A GQA Llama config (8 heads, 2 KV heads) saved as a model directory's config.json."""
    path = tmp_path_factory.mktemp("cfg") / "model"
    transformers.LlamaConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                             intermediate_size=352, vocab_size=512).save_pretrained(path)
    return str(path)


def test_params_table(main, model_dir, capsys):
    rc = main(["params", model_dir, "--ranks", "4", "8", "--targets", "q_proj,k_proj,v_proj,o_proj"])
    out = capsys.readouterr().out
    assert rc == 0
    c8 = rank.count_lora_parameters(model_dir, r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert f"LlamaForCausalLM from {model_dir}: {c8.base:,d} parameters" in out
    assert "q_proj x3, k_proj x3, v_proj x3, o_proj x3 (12 matrices)" in out
    header = next(line for line in out.splitlines() if "trainable" in line and "% of total" in line)
    assert header.split() == ["r", "trainable", "%", "of", "total", "q_proj", "k_proj", "v_proj", "o_proj"]
    row8 = next(line.split() for line in out.splitlines() if line.split()[:1] == ["8"])
    # r, trainable, %, then r * (in + out) per matrix: q 8*(128+128), k and v 8*(128+32) (GQA), o 8*(128+128)
    assert row8 == ["8", f"{c8.trainable:,d}", f"{c8.percent:.4f}%", "2,048", "1,280", "1,280", "2,048"]
    assert c8.trainable == 3 * (2048 + 1280 + 1280 + 2048)


def test_params_default_presets_one_table_each(main, model_dir, capsys):
    assert main(["params", model_dir]) == 0
    out = capsys.readouterr().out
    for preset in ("qv", "attention", "all-linear"):
        assert f"targets {preset}:" in out
    assert "gate_proj x3" in out and "lm_head" not in out.split("targets all-linear")[1]
    rows = [line.split()[0] for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert rows == ["4", "8", "16", "32", "64"] * 3


def test_params_csv_and_json(main, model_dir, capsys):
    assert main(["params", model_dir, "-r", "16", "-t", "attention", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["module"] for r in rows] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert rows[1]["params_per_matrix"] == str(16 * (128 + 32))
    total = rank.count_lora_parameters(model_dir, 16, "attention").trainable
    assert all(r["trainable"] == str(total) and r["targets"] == "attention" for r in rows)

    assert main(["params", model_dir, "-r", "2", "-t", "mlp", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    table = data["tables"][0]
    assert table["modules"] == ["gate_proj", "up_proj", "down_proj"]
    assert table["rows"][0]["trainable"] == 3 * 3 * 2 * (128 + 352)


def test_params_list_modules_and_recommendation(main, model_dir, capsys):
    assert main(["params", os.path.join(model_dir, "config.json"), "--list-modules"]) == 0
    out = capsys.readouterr().out
    assert "k_proj" in out and "128->32" in out and "output head" in out
    assert main(["params", model_dir, "-r", "16", "--task", "domain", "--dataset-size", "20000"]) == 0
    out = capsys.readouterr().out
    assert "recommendation for domain: r=16, alpha=32, targets=all-linear" in out


def test_params_builtin(main, capsys):
    assert main(["params", "builtin", "-r", "8", "-t", "qv"]) == 0
    assert "LlamaForCausalLM from builtin" in capsys.readouterr().out


def _error(main, capsys, argv):
    rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured
    assert len(lines) == 1 and lines[0].startswith(f"lora-kernels {argv[0]}: error: "), lines
    return lines[0]


def test_params_errors(main, model_dir, capsys, tmp_path):
    missing = str(tmp_path / "nope")
    assert missing in _error(main, capsys, ["params", missing]) and "no such file" in _error(main, capsys, ["params", missing])
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama", ')
    assert "not valid JSON" in _error(main, capsys, ["params", str(bad)])
    bad.write_text('{"model_type": "definitely-not-a-model"}')
    assert "does not know model_type 'definitely-not-a-model'" in _error(main, capsys, ["params", str(bad)])
    msg = _error(main, capsys, ["params", model_dir, "-t", "q_proj,qkv_projj"])
    assert "'qkv_projj' matches no module" in msg and "q_proj" in msg
    assert "at least 1, got 0" in _error(main, capsys, ["params", model_dir, "-r", "0", "8"])
    assert "--dataset-size needs --task" in _error(main, capsys, ["params", model_dir, "--dataset-size", "5"])
    assert "unknown task" in _error(main, capsys, ["params", model_dir, "--task", "dancing"])


def test_entry_point_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lora_kernels.cli", "params", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "lora-kernels params: error:" in proc.stderr and "missing" in proc.stderr
