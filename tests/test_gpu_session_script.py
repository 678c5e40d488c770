"""benchmarks/gpu_session.sh fits one device call: at most 8 files under $OUT come back from it, and its parts'
time limits add up to less than the 600 s a command may run."""
import re
from pathlib import Path

SCRIPT = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh").read_text()


def test_at_most_eight_output_files():
    names = set(re.findall(r'\$OUT/([A-Za-z0-9._-]+)', SCRIPT))
    assert names and len(names) <= 8, sorted(names)


def test_part_limits_fit_one_call():
    limits = {name: int(value) for name, value in re.findall(r'\$\{([A-Z_]+_S):-(\d+)\}', SCRIPT)}
    assert set(limits) == {"TEST_S", "PROBE_S", "SWEEP_S", "CSRC_TEST_S", "CSRC_BENCH_S", "BENCH_S"}, limits
    assert sum(limits.values()) <= 590, limits
