"""The comparison behind .ci/peft_suite.sh (PEFT's own tests, stock and patched): it fails on a test that passes
stock and fails patched, and when the fused op never ran."""
import importlib.util
import json
from pathlib import Path


def _plugin():
    path = Path(__file__).resolve().parents[1] / ".ci" / "peft_plugin.py"
    spec = importlib.util.spec_from_file_location("lk_peft_plugin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STOCK = {"a": {"outcome": "passed"}, "b": {"outcome": "failed"}, "c": {"outcome": "skipped"},
         "d": {"outcome": "passed"}}


def _run(tmp_path, capsys, patched):
    for name, data in (("stock", STOCK), ("patched", patched)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    rc = _plugin().main(["compare", str(tmp_path / "stock.json"), str(tmp_path / "patched.json")])
    return rc, capsys.readouterr()


def test_identical_results_with_the_op_pass(tmp_path, capsys):
    patched = {"a": {"outcome": "passed", "fused": True, "reasons": []}, "b": {"outcome": "failed", "fused": False},
               "c": {"outcome": "skipped"}, "d": {"outcome": "passed", "fused": False,
                                                  "reasons": ["skipped: Conv2d layers are not covered"]}}
    rc, out = _run(tmp_path, capsys, patched)
    assert rc == 0, out.err
    counts = {line.rsplit(None, 1)[0].strip(): int(line.rsplit(None, 1)[1]) for line in out.out.splitlines()
              if line.startswith("  ") and line.rsplit(None, 1)[1].isdigit() and not line.startswith("    ")}
    assert counts["passed both"] == 2 and counts["failed both"] == 1 and counts["failed only patched"] == 0
    assert counts["ran the fused op (patched)"] == 1
    assert "1  skipped: Conv2d layers are not covered" in out.out


def test_a_patched_only_failure_fails(tmp_path, capsys):
    patched = {"a": {"outcome": "failed", "fused": True}, "b": {"outcome": "failed"}, "c": {"outcome": "skipped"},
               "d": {"outcome": "passed", "fused": True}}
    rc, out = _run(tmp_path, capsys, patched)
    assert rc == 1 and "REGRESSION (passed stock, failed patched): a" in out.out
    assert "1 test(s) pass with stock PEFT and fail patched" in out.err


def test_a_test_missing_from_the_patched_run_fails(tmp_path, capsys):
    rc, out = _run(tmp_path, capsys, {"a": {"outcome": "passed", "fused": True}})
    assert rc == 1 and "missing patched): d" in out.out


def test_no_fused_op_fails(tmp_path, capsys):
    patched = {n: dict(r, fused=False) for n, r in STOCK.items()}
    rc, out = _run(tmp_path, capsys, patched)
    assert rc == 1 and "no test ran the fused op" in out.err
