"""`lora-kernels bench` on CPU (smoke size): CSV schema, tables with speedups, plots from a CSV, skips with
reasons, the time limit, one-line errors. The GPU figures themselves are measured on a GPU, not here."""
import csv
import os
import re
import time

import pytest

from lora_kernels.bench import report, results, timing
from lora_kernels.cli import main

SCHEMA = "bench,provider,m,n,k,r,dtype,ms_p50,ms_p20,ms_p80,peak_mem_mb,gpu,torch,triton,commit,date".split(",")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench(capsys, *argv):
    rc = main(["bench", "--quiet", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_schema_is_the_design_one():
    assert list(results.COLUMNS) == SCHEMA


def test_layer_sweep_writes_schema_rows_table_and_png(tmp_path, capsys):
    out_csv, png = tmp_path / "r.csv", tmp_path / "p.png"
    rc, out, err = _bench(capsys, "--mode", "layer", "--shapes", "64x128", "--m", "4", "--ranks", "0", "8",
                          "--reps", "1", "--csv", str(out_csv), "--plot", str(png))
    assert rc == 0, err
    table = _read(out_csv)
    assert table[0] == SCHEMA
    rows = [dict(zip(SCHEMA, r)) for r in table[1:]]
    # per mode: lora_kernels, peft_bnb, dequant_cublas at r in {0, 8}, and cublas_bf16 at r=0
    assert len(rows) == 14
    got = {(r["bench"], r["provider"], r["r"]) for r in rows}
    for bench in ("layer_fwd", "layer_fwd_bwd"):
        for provider in ("lora_kernels[patched]", "peft_bnb", "dequant_cublas"):
            assert {(bench, provider, "0"), (bench, provider, "8")} <= got
        assert (bench, "cublas_bf16", "0") in got and (bench, "cublas_bf16", "8") not in got
    for r in rows:
        assert (r["m"], r["n"], r["k"], r["dtype"], r["gpu"], r["peak_mem_mb"]) == ("4", "64", "128", "bf16", "cpu", "")
        p20, p50, p80 = float(r["ms_p20"]), float(r["ms_p50"]), float(r["ms_p80"])
        assert 0 < p20 <= p50 <= p80
        assert r["torch"] and r["triton"] and r["commit"] and r["date"].endswith("Z")
    assert len({r["date"] for r in rows}) == 1  # one stamp per run
    assert "vs peft_bnb" in out and "vs dequant_cublas" in out and "vs cublas_bf16 (r=0)" in out
    assert "not kernel figures" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("64x128") and ln.split()[2] == "8")
    assert line.count("x ") + line.endswith("x") >= 3 and "%" in line  # speedups and the LoRA overhead
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_appending_keeps_one_header(tmp_path, capsys):
    out_csv = tmp_path / "r.csv"
    argv = ["--mode", "layer_fwd", "--shapes", "64x128", "--m", "2", "--ranks", "0", "--providers", "lora_kernels",
            "--reps", "1", "--csv", str(out_csv)]
    assert _bench(capsys, *argv)[0] == 0
    assert _bench(capsys, *argv)[0] == 0
    table = _read(out_csv)
    assert table[0] == SCHEMA and sum(r == SCHEMA for r in table) == 1 and len(table) == 3


def test_train_step_rows_and_table(tmp_path, capsys):
    out_csv = tmp_path / "t.csv"
    rc, out, err = _bench(capsys, "--mode", "train_step", "--layers", "1", "--seq-len", "16", "--train-ranks", "4",
                          "--train-steps", "2", "--train-warmup", "1", "--csv", str(out_csv))
    assert rc == 0, err
    rows = results.read_csv(str(out_csv))
    assert [r["provider"] for r in rows] == ["peft_bnb", "lora_kernels[patched]", "peft_bf16"]
    for r in rows:
        assert (r["bench"], r["m"], r["n"], r["k"], r["r"]) == ("train_step", 16, 128, 1, 4)
        assert r["ms_p50"] > 0
    assert "train_step" in out and "tokens/s" in out and "vs peft_bnb" in out
    # the patched model trains like stock PEFT, step by step (3 steps: warm-up included, so AdamW has moved B)
    parity = re.search(r"train_step r=4: loss of lora_kernels vs peft_bnb, step 1 (\S+) vs (\S+), step 3 (\S+) vs (\S+); "
                       r"largest relative difference (\S+)", out)
    assert parity, out
    assert float(parity[1]) > 0 and float(parity[3]) != float(parity[1])
    assert float(parity[5]) < 1e-2


def test_no_argument_run_on_cpu_is_under_a_minute(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    rc, out, err = _bench(capsys)
    assert rc == 0, err
    assert time.perf_counter() - t0 < 60
    written = tmp_path / "lora-kernels-bench"
    files = os.listdir(written)
    assert len(files) == 1 and files[0].startswith("cpu-") and files[0].endswith(".csv")
    assert not (tmp_path / "benchmarks").exists()  # CPU figures never land among the GPU results
    rows = results.read_csv(str(written / files[0]))
    benches = {r["bench"] for r in rows}
    # all three benches, unless a loaded machine hit the smoke preset's 45 s limit (and then it says so)
    assert benches == {"layer_fwd", "layer_fwd_bwd", "train_step"} or "time limit of 45 s reached" in out + err
    assert "preset smoke" in out and "not kernel figures" in out


def _gpu_rows():
    env = dict(gpu="NVIDIA H100 80GB HBM3", torch="2.11.0", triton="3.6.0", commit="abc", date="2026-01-01T00:00:00Z")
    rows = []

    def add(bench, provider, m, n, k, r, ms, mem=100.0):
        rows.append(results.make_row(bench, provider, m, n, k, r, "bf16", (ms, ms * 0.9, ms * 1.1), mem, env))

    for bench, scale in (("layer_fwd", 1.0), ("layer_fwd_bwd", 2.5)):
        add(bench, "lora_kernels", 8192, 4096, 4096, 0, 1.00 * scale)
        add(bench, "lora_kernels", 8192, 4096, 4096, 16, 1.05 * scale)  # +5% overhead: over the 2% target
        add(bench, "cublas_bf16", 8192, 4096, 4096, 0, 1.00 * scale)
        add(bench, "peft_bnb", 8192, 4096, 4096, 16, 2.10 * scale)
        add(bench, "dequant_cublas", 8192, 4096, 4096, 16, 1.26 * scale)
        for m in (1, 16):
            add(bench, "lora_kernels", m, 8192, 8192, 16, 0.02 * scale)
            add(bench, "cublas_bf16", m, 8192, 8192, 0, 0.06 * scale)
            add(bench, "peft_bnb", m, 8192, 8192, 16, 0.10 * scale)
    add("train_step", "peft_bnb", 2048, 4096, 4, 16, 200.0, mem=9000.0)
    add("train_step", "lora_kernels", 2048, 4096, 4, 16, 125.0, mem=8000.0)
    add("train_step", "peft_bf16", 2048, 4096, 4, 16, 150.0, mem=20000.0)
    return rows


def test_speedups_and_targets_from_rows():
    rows = _gpu_rows()
    text = report.speedup_table(rows)
    assert "NVIDIA H100 80GB HBM3; torch 2.11.0, triton 3.6.0" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("4096x4096") and ln.split()[1:3] == ["8192", "16"])
    assert "2.00x" in line and "1.20x" in line and "0.95x" in line and "+5.0%" in line
    checks = {t: (v, s) for t, v, s in report.check_targets(rows)}
    assert checks["layer_fwd M=8192 4096x4096 r=16: <= 1.10x cublas_bf16 time"] == ("1.05x", "met")
    assert checks["layer_fwd M=8192 4096x4096 r=16: >= 1.28x faster than peft_bnb"] == ("2.00x", "met")
    assert checks["layer_fwd LoRA overhead M=8192 4096x4096 r=16: <= 2.0%"] == ("+5.0%", "MISSED")
    assert checks["layer_fwd_bwd LoRA overhead M=8192 4096x4096 r=16: <= 2.0%"] == ("+5.0%", "MISSED")
    assert checks["decode layer_fwd M=1 8192x8192 r=16: >= 2.5x faster than cublas_bf16"] == ("3.00x", "met")
    assert checks["train_step r=16: >= 1.3x tokens/s of peft_bnb"] == ("1.60x", "met")
    assert checks["train_step r=16: peak memory <= peft_bnb's"][1] == "met"
    train = next(ln for ln in text.splitlines() if "lora_kernels" in ln and "16,384" in ln)  # 2048 / 125 ms
    assert "1.60x" in train and "1.20x" in train and "0.89x" in train
    md = report.speedup_table(rows, markdown=True)
    assert "| shape NxK | M | r |" in md and "| ---: |" in md


def test_newest_row_wins_and_devices_do_not_mix():
    rows = _gpu_rows()
    newer = dict(rows[1], ms_p50=2.0, date="2026-02-01T00:00:00Z")
    other = dict(rows[0], gpu="NVIDIA A100", ms_p50=50.0)
    picked, note = report.select_gpu([other] + rows + [newer])
    assert "2 devices" in note and all(r["gpu"].startswith("NVIDIA H100") for r in picked)
    mine = [r for r in picked if r["bench"] == "layer_fwd" and r["provider"] == "lora_kernels" and r["r"] == 16
            and r["m"] == 8192]
    assert len(mine) == 1 and mine[0]["ms_p50"] == 2.0


def test_plot_and_markdown_from_csv(tmp_path, capsys):
    src = tmp_path / "h100.csv"
    results.append_csv(str(src), _gpu_rows())
    md = tmp_path / "t.md"
    rc, out, err = _bench(capsys, "--from-csv", str(src), "--plot", "--markdown", str(md))
    assert rc == 0, err
    assert (tmp_path / "h100.png").read_bytes()[:8] == PNG_MAGIC
    assert "targets" in out and "MISSED" in out and "vs peft_bnb" in out
    assert md.read_text().startswith("NVIDIA H100")


def test_a_provider_that_cannot_run_is_skipped_with_its_reason(tmp_path, capsys):
    rc, out, err = _bench(capsys, "--mode", "layer_fwd", "--shapes", "64x128", "--m", "2", "--ranks", "8",
                          "--providers", "lora_kernels", "lora_kernels_fused", "--reps", "1", "--no-csv")
    assert rc == 0
    assert "skip layer_fwd lora_kernels_fused 64x128 M=2 r=8: forces the Triton fused path" in out + err
    assert "1 case(s) skipped" in out


def test_time_limit_stops_and_reports(tmp_path, capsys):
    rc, out, err = _bench(capsys, "--mode", "layer_fwd", "--shapes", "64x128", "--m", "2", "3", "--ranks", "0",
                          "--reps", "1", "--time-limit", "1e-9", "--csv", str(tmp_path / "r.csv"))
    assert rc == 1  # nothing measured
    assert "time limit of 1e-09 s reached: 8 case(s) not run" in out + err


def test_quantiles():
    assert timing.quantiles([5, 1, 3, 2, 4]) == (3.0, 1.8, 4.2)
    assert timing.quantiles([7.0]) == (7.0, 7.0, 7.0)


def test_time_cpu_resets_gradients_and_excludes_warmup():
    import torch

    x = torch.ones(3, requires_grad=True)
    calls = []

    def fn():
        assert x.grad is None  # reset before every call, so gradients never accumulate into the timing
        (x * 2).sum().backward()
        calls.append(1)

    t = timing.time_cpu(fn, grad_to_none=[x], reps=4)
    assert t.reps == 4 and len(calls) == 5 and t.peak_mem_mb is None


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "12y4"], "shape '12y4' is neither a preset"),
    (["--ranks", "-1"], "--ranks values must be at least 0"),
    (["--m", "a"], "--m takes integers"),
    (["--providers", "nope"], "unknown provider 'nope'"),
    (["--mode", "bogus"], "--mode 'bogus' is not one of"),
    (["--device", "cuda"], "no CUDA device is available"),
    (["--preset", "full"], "is sized for a GPU"),
    (["--from-csv", "missing.csv"], "missing.csv: no such file"),
    (["--plot", "out.jpg"], "give a path ending in .png"),
    (["--csv", "a.csv", "--no-csv"], "contradict"),
    (["--layers", "0", "--mode", "train_step"], "--layers must be at least 1"),
])
def test_bad_options_give_one_line(tmp_path, monkeypatch, capsys, argv, message):
    import torch

    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.chdir(tmp_path)
    rc, out, err = _bench(capsys, *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-kernels bench: error: ") and message in lines[0], err


def test_foreign_csv_is_refused(tmp_path, capsys):
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    rc, _, err = _bench(capsys, "--shapes", "64x128", "--mode", "layer_fwd", "--csv", str(bad))
    assert rc == 2 and "expected bench,provider" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _bench(capsys, "--from-csv", str(bad))
    assert rc == 2 and "not a lora-kernels bench CSV" in err


class _FakeEvent:
    """A CUDA event stand-in on CPU: record() takes the time, elapsed_time() gives ms, as CUDA's does."""
    log = None

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self):
        import time as _time

        self.t = _time.perf_counter()
        _FakeEvent.log.append("event")

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_cuda_timing_protocol_with_a_fake_device(monkeypatch):
    """The CUDA path's logic on CPU: an untimed first call, a peak-memory call with the peak counter reset, the flush
    before every timed call (never inside the timed region), gradients reset before every call, and only the timed
    runs in the statistics."""
    import torch

    log = []
    _FakeEvent.log = log
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: log.append("reset_peak"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    real_empty = torch.empty

    class _Flush:
        def zero_(self):
            log.append("flush")

    def fake_empty(*size, dtype=None, device=None, **kw):
        if size and size[0] == timing.FLUSH_BYTES:
            log.append("alloc_flush")
            return _Flush()
        return real_empty(*size, dtype=dtype, device=device, **kw)

    monkeypatch.setattr(torch, "empty", fake_empty)
    x = torch.ones(2, requires_grad=True)

    def fn():
        assert x.grad is None
        (x * 3).sum().backward()
        log.append("call")

    t = timing._time_cuda(fn, torch.device("cpu"), [x], warmup_ms=0.0, rep_ms=0.0, min_reps=7, max_reps=100)
    assert t.reps == 7 and t.peak_mem_mb == 3.0 and 0 < t.p20 <= t.p50 <= t.p80
    assert x.grad is None
    calls = [i for i, e in enumerate(log) if e == "call"]
    assert len(calls) == 1 + 1 + 5 + 1 + 7  # first, peak memory, estimate, one warm-up, timed
    assert log.index("reset_peak") < calls[1] and log.index("alloc_flush") > calls[1]  # flush not in peak memory
    timed = calls[-7:]
    for i in timed:
        assert log[i - 2:i + 2] == ["flush", "event", "call", "event"]  # flush outside the timed region
    assert log[-1] == "sync"


def test_commit_stamp(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_COMMIT", "0123456789ab")
    assert results.environment("cpu")["commit"] == "0123456789ab"
    monkeypatch.delenv("LORA_KERNELS_COMMIT")
    commit = results.git_commit()
    assert commit.startswith("v") or len(commit.split("+")[0]) == 12


def test_cpu_rows_measure_what_a_cpu_user_gets(tmp_path, capsys, monkeypatch):
    """On CPU the lora_kernels rows are the patched PEFT layer (PEFT's forward there by default); with
    LORA_KERNELS_PATCH_CPU=op they are the op's PyTorch path, labelled so."""
    argv = ["--mode", "layer_fwd", "--shapes", "64x128", "--m", "2", "--ranks", "8", "--providers", "lora_kernels",
            "--reps", "1"]
    labels = []
    for setting in (None, "op"):
        if setting:
            monkeypatch.setenv("LORA_KERNELS_PATCH_CPU", setting)
        out_csv = tmp_path / f"{setting}.csv"
        assert _bench(capsys, *argv, "--csv", str(out_csv))[0] == 0
        labels.append(results.read_csv(str(out_csv))[0]["provider"])
    assert labels == ["lora_kernels[patched]", "lora_kernels[reference]"]


@pytest.mark.parametrize("device,index", [("cuda", None), ("cuda:1", 1)])
def test_cuda_bench_sets_the_device_only_when_indexed(monkeypatch, device, index):
    """torch 2.11 refuses torch.cuda.set_device("cuda") (no index): the first GPU run of the bench died on it."""
    import torch

    from lora_kernels.bench import presets, runner

    calls = []

    def set_device(dev):
        if torch.device(dev).index is None:
            raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")
        calls.append(torch.device(dev).index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(runner, "_run", lambda *a: "ran")
    monkeypatch.setattr(presets.BenchSpec, "validate", lambda self: None)
    assert runner.run_bench(presets.BenchSpec(device=device), progress=False) == "ran"
    assert calls == ([] if index is None else [index])


def test_cpu_layer_providers_are_timed_interleaved(monkeypatch):
    """One call of each provider per round, the order reversed every other round, each call in its provider's
    environment; a provider that fails is reported alone."""
    from lora_kernels.bench import presets, providers, runner

    order = []

    def build_case(provider, mode, n, k, m, r, **kw):
        if provider == "broken":
            raise RuntimeError("cannot build")

        def fn():
            order.append((provider, os.environ.get("LK_TEST_PROVIDER")))
        return providers.Case(fn=fn, label=provider, env={"LK_TEST_PROVIDER": provider})

    monkeypatch.setattr(providers, "build_case", build_case)
    monkeypatch.setattr(runner, "LAYER_GROUP_MIN_S", 0.0)
    spec = presets.BenchSpec(cpu_reps=3)
    tasks = [runner.Task("layer_fwd", p, 32, 16, 1, 4) for p in ("a", "b", "broken")]
    out = runner._measure_layer_group(tasks, spec, runner._Inputs(spec))
    assert isinstance(out[id(tasks[2])], RuntimeError)
    assert [out[id(t)][1].reps for t in tasks[:2]] == [3, 3]
    assert order == [("a", "a"), ("b", "b"),  # warm-up
                     ("a", "a"), ("b", "b"), ("b", "b"), ("a", "a"), ("a", "a"), ("b", "b")]
