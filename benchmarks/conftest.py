"""pytest-benchmark suites for lora-kernels: `pytest benchmarks/ --benchmark-only`.

Size: LK_BENCH_SIZE=smoke (the default without CUDA: tiny shapes, the PyTorch reference, seconds) or
full (the default on a GPU: the targets' shapes and M values, and a train step of Llama-3-8B layers).
`--lk-csv PATH` also appends each result as a row of the lora-kernels CSV schema (docs/bench.md), so these
suites and `lora-kernels bench` feed the same tables and plots.

On CUDA every round is: gradients reset, the 256 MiB L2 flush buffer zeroed, synchronize (pytest-benchmark's
untimed setup), then the call and a synchronize (timed); warm-up rounds are not recorded. The figures include
the synchronize (a few microseconds); `lora-kernels bench` times with CUDA events and is the precise tool.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _lk_bench  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--lk-csv", default=None, metavar="PATH",
                     help="append each benchmark as a row of the lora-kernels CSV schema")


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--lk-csv", default=None)
    if path and _lk_bench.ROWS:
        from lora_kernels.bench.results import append_csv

        append_csv(path, _lk_bench.ROWS)


@pytest.fixture(scope="session")
def bench_env():
    from lora_kernels.bench.results import environment

    return environment(_lk_bench.DEVICE)
