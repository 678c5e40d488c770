"""`lora-kernels sweep`: a tiny sweep writes its CSV and PNG; diagnoses; data handling; one-line errors."""
import csv
import json
import math
import sys

import pytest

from lora_kernels import cli, sweep
from lora_kernels.errors import CLIError

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
TINY = dict(steps=4, batch_size=2, seq_len=16, eval_every=2, max_eval_windows=4, progress=False, log=lambda *a: None)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def main():
    return cli.main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from lora_kernels.demo import llama_config, save_tiny_llama

    path = tmp_path_factory.mktemp("sweep") / "tiny"
    save_tiny_llama(path, llama_config(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                       intermediate_size=48, initializer_range=0.1))
    return str(path)


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_tiny_sweep_writes_csv_and_plot(tmp_path):
    res = sweep.run_sweep(None, None, ranks=(4, 2), alpha=16, rslora=True, out_dir=tmp_path, device="cpu",
                          patch=False, **TINY)
    rows = _rows(res.csv_path)
    assert tuple(rows[0]) == sweep.CSV_COLUMNS
    assert [int(r["r"]) for r in rows] == [2, 4]
    for row in rows:
        r = int(row["r"])
        assert float(row["alpha"]) == 16 and float(row["scaling"]) == pytest.approx(16 / math.sqrt(r))
        assert row["targets"] == "all-linear" and row["device"].startswith("cpu")
        # 2 layers of q, o (64 + 64), k, v (64 + 32, GQA) and gate, up, down (64 + 200): 2480 per unit of r
        assert int(row["trainable_params"]) == 2480 * r
        assert float(row["eval_loss"]) > 0 and float(row["tokens_per_s"]) > 0 and row["diagnosis"]
    assert sum(row["best"] == "True" for row in rows) == 1
    assert res.best_r in (2, 4) and res.row(res.best_r).diagnosis.startswith("best")
    # LoRA starts with B = 0, so every rank starts from the same base model's eval loss
    assert rows[0]["eval_loss_start"] == rows[1]["eval_loss_start"]
    curves = _rows(res.curves_path)
    assert tuple(curves[0]) == sweep.CURVE_COLUMNS
    assert [c["step"] for c in curves if c["r"] == "2"] == ["0", "1", "2", "3", "4"]
    assert [c["eval_loss"] != "" for c in curves if c["r"] == "2"] == [True, False, True, False, True]
    with open(res.plot_path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    assert res.plot_path == str(tmp_path / "sweep.png")


def test_trainable_params_in_csv_equal_peft(tmp_path):
    import peft

    from lora_kernels.demo import build_llama, llama_config

    res = sweep.run_sweep(None, None, ranks=(3,), targets="attention", out_dir=tmp_path, device="cpu",
                          patch=False, plot=False, **TINY)
    pm = peft.get_peft_model(build_llama(llama_config()), peft.LoraConfig(
        r=3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert res.results[0].trainable_params == pm.get_nb_trainable_parameters()[0]
    assert res.plot_path is None and not (tmp_path / "sweep.png").exists()


def test_cli_sweep_model_dir_jsonl(main, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    text = "The rank decides how much an adapter can learn. " * 8
    data.write_text("\n".join(json.dumps({"text": text + str(i)}) for i in range(6)) + "\n")
    out_dir = tmp_path / "out"
    rc = main(["sweep", tiny_model_dir, str(data), "--ranks", "1", "2", "--steps", "3", "--batch-size", "2",
               "--seq-len", "16", "--targets", "qv", "--out", str(out_dir), "--quiet", "--no-patch", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = captured.out
    assert "device cpu" in out and "backend PEFT's own forward (--no-patch)" in out
    assert "best r = " in out and str(out_dir / "sweep.csv") in out
    rows = _rows(out_dir / "sweep.csv")
    assert [(r["r"], r["alpha"], r["scaling"], r["targets"]) for r in rows] == [("1", "2", "2", "qv"),
                                                                                  ("2", "4", "2", "qv")]
    assert [int(r["trainable_params"]) for r in rows] == [1 * (32 + 32) + 1 * (32 + 16), 2 * (32 + 32) + 2 * (32 + 16)]
    assert (out_dir / "sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_sweep_patched_on_cpu(tmp_path):
    res = sweep.run_sweep(None, None, ranks=(2,), out_dir=tmp_path, device="cpu", patch=True, plot=False, **TINY)
    assert res.results[0].patched_layers == 14 and "patched 14 of 14" in res.backend


def test_forced_patch_without_patch_module_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lora_kernels.patch", None)  # import fails as if the file were missing
    with pytest.raises(CLIError, match="lora_kernels.patch is not available"):
        sweep.run_sweep(None, None, ranks=(2,), out_dir=tmp_path, device="cpu", patch=True, plot=False, **TINY)


def _result(r, train, ev, curve, params):
    return sweep.RankResult(r=r, alpha=2 * r, scaling=2.0, trainable_params=params, percent_trainable=0.0,
                            train_loss=train, eval_loss=ev, eval_loss_start=5.0, min_eval_loss=min(e for _, _, e in curve),
                            min_eval_step=0, tokens_per_s=1.0, train_seconds=1.0, patched_layers=0, curve=curve)


def test_diagnose_names_best_too_low_and_too_high():
    plateau = [(0, None, 5.0), (10, 3.2, 3.3), (20, 3.1, 3.21), (30, 3.1, 3.2), (40, 3.1, 3.2)]
    good = [(0, None, 5.0), (10, 3.0, 3.1), (20, 2.8, 2.9), (30, 2.7, 2.85), (40, 2.6, 2.8)]
    overfit = [(0, None, 5.0), (10, 2.5, 2.9), (20, 2.0, 2.85), (30, 1.5, 3.0), (40, 1.0, 3.3)]
    results = [_result(4, 3.1, 3.2, plateau, 100), _result(16, 2.6, 2.8, good, 400),
               _result(64, 1.0, 3.3, overfit, 1600)]
    assert sweep.diagnose(results) == 16
    low, best, high = (x.diagnosis for x in results)
    assert low.startswith("too low: eval loss plateaus at 3.2000")
    assert best.startswith("best")
    assert high.startswith("too high: over-fits") and "2.850 -> 3.300" in high


def test_diagnose_close_and_wasteful():
    flat = [(0, None, 5.0), (10, 3.0, 3.0), (20, 3.0, 3.0)]
    worse = [(0, None, 5.0), (10, 3.0, 3.2), (20, 2.9, 3.2)]
    results = [_result(8, 3.0, 3.001, flat, 10), _result(16, 3.0, 3.0, flat, 20), _result(32, 2.9, 3.2, worse, 40)]
    assert sweep.diagnose(results) == 16
    assert results[0].diagnosis.startswith("as good as r=16") and "fewer parameters" in results[0].diagnosis
    assert results[2].diagnosis.startswith("too high: 2.0x the parameters of r=16")


def test_read_text_and_tokenize(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("héllo\n")
    assert sweep.read_text(txt) == "héllo\n"
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert sweep.read_text(jl) == "one\n\ntwo"
    ids, name = sweep.tokenize("hé", None, 256)
    assert name == "bytes" and ids.tolist() == [104, 195, 169]
    with pytest.raises(ValueError, match="fewer than the 256 byte tokens"):
        sweep.tokenize("hi", None, 100)
    train, held = sweep.split_ids(ids.repeat(100), 0.1, 16)
    assert held.numel() == 30 and train.numel() == 270


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"\xff\xfe\xfa", "not UTF-8"),
])
def test_bad_text_files(tmp_path, content, message):
    path = tmp_path / "d.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        sweep.read_text(path)


@pytest.mark.parametrize("content,message", [
    ('{"text": "ok"}\nnot json\n', "line 2: not valid JSON"),
    ('{"body": "no text"}\n', 'line 1: no "text" string field'),
    ('{"text": ""}\n', "is empty"),
])
def test_bad_jsonl_files(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        sweep.read_text(path)


def _error(main, capsys, argv):
    rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured
    assert len(lines) == 1 and lines[0].startswith("lora-kernels sweep: error: "), lines
    return lines[0]


def test_sweep_cli_errors(main, capsys, tmp_path, tiny_model_dir):
    out = ["--out", str(tmp_path / "o"), "--quiet"]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert f"DATA {empty} is empty" in _error(main, capsys, ["sweep", "builtin", str(empty)] + out)
    assert "no such file" in _error(main, capsys, ["sweep", "builtin", str(tmp_path / "none.txt")] + out)
    assert "is a directory" in _error(main, capsys, ["sweep", "builtin", str(tmp_path)] + out)
    assert "positive integer, got 0" in _error(main, capsys, ["sweep", "--ranks", "4", "0"] + out)
    assert "no such file or directory" in _error(main, capsys, ["sweep", str(tmp_path / "nomodel")] + out)
    assert "lora-kernels sweep builtin" in _error(main, capsys, ["sweep", str(empty)] + out)
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "no weights" in _error(main, capsys, ["sweep", str(cfg_only)] + out)
    assert "'wq_proj' matches no module" in _error(main, capsys, ["sweep", tiny_model_dir, "-t", "wq_proj"] + out)
    assert "alpha" in _error(main, capsys, ["sweep", "--alpha", "lots"] + out)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert "too few for seq_len 64" in _error(main, capsys, ["sweep", "builtin", str(short)] + out)
    assert not (tmp_path / "o" / "sweep.csv").exists()


def test_sweep_uses_the_model_dirs_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    from lora_kernels.demo import BUILTIN_CORPUS, llama_config, save_tiny_llama

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([BUILTIN_CORPUS], tokenizers.trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]"]))
    model_dir = tmp_path / "m"
    save_tiny_llama(model_dir, llama_config(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                            intermediate_size=48))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)
    data = tmp_path / "d.txt"
    data.write_text(BUILTIN_CORPUS * 2)
    ids, name = sweep.tokenize(data.read_text(), str(model_dir), 256)
    assert "from" in name and name != "bytes" and ids.numel() < len(BUILTIN_CORPUS.encode()) and int(ids.max()) < 200
    lines = []
    res = sweep.run_sweep(str(model_dir), data, ranks=(2,), out_dir=tmp_path / "o", device="cpu", plot=False,
                          **{**TINY, "log": lines.append})
    assert res.results[0].eval_loss > 0 and "bytes" not in lines[0] and str(model_dir) in lines[0]
