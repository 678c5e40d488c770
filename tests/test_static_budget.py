"""Issue 10's decode budgets, held on the static sm_90 model's counts (benchmarks/static_model.py).

The 4-bit forward and backward-dx GEMMs are compiled for sm_90 on this CPU (a subprocess without
TRITON_INTERPRET) with a few of their autotune tiles and the dense (BASE=1) loop of the same tile, and
their main loops are counted from SASS (instructions) and PTX (what each global load reads). Budgets:

- decode: (I_4bit - I_dense) instructions per warp per iteration * 32 * num_warps / (BLOCK_N * BLOCK_K)
  <= 3 per W element on the decode tiles (BLOCK_M = 16, M <= 16), <= 4.5 on the large tiles (BLOCK_M >= 64);
- no global or async load from the code table inside the loop;
- at most one load per (row, block) from each scale array (the code2 and absmax2 arrays of nested
  scales included): <= max(pairs, threads x blocks per row), since Triton replicates a per-row vector
  across the threads when a tile has fewer rows than threads;
- large tiles: the decode overlaps the tensor-core work: at least one HGMMA group in flight
  (WARPGROUP.DEPBAR.LE gsb0, >= 1), or, if the loop waits (0x0), the model at M=8192 4096x4096 is
  tensor-bound, i.e. the decode's issue time is hidden under the tensor time. On the decode tiles the
  tensor work is a few percent of the loop; their wait depth is printed, not budgeted.

Each case's message gives the measured figure and its budget. `pytest -s` prints all of them.
"""
import pytest

from benchmarks import static_model as sm

pytestmark = pytest.mark.slow

# (direction, tile config, M mode): decode tiles at M = 1 (forward) / 16 (dx), the 128x128x64 w8 for the
# forward, and for dx the large tile it draws at blocksize 64 (configs.prune_for prefers tiles within a block).
CASES = [
    ("fwd", "16x64x128 w4 s4", 1),
    ("fwd", "16x32x128 w4 s4", 1),
    ("fwd", "128x128x64 w8 s3", 512),
    ("bwd", "16x64x128 w4 s4", 16),
    ("bwd", "128x64x64 w8 s3", 512),
]
# Not met yet (counted with triton 3.9). dx keeps bitsandbytes' exact arithmetic with the 16-entry code table
# gathered per element (an async copy or load from code_ptr). The forward (16-bit x) now looks codes up from 16
# registers with a select tree (configs.CODE_REGS): no table loads in its loop, but about 25 instructions per
# element, 3x the gather's count; the gather cost far more on the GPU than its count said (cp.async copies
# through shared memory: 707 us measured at 8192x8192 M = 1 on an H200). A bf16 table (PRMT lookup) would meet
# the instruction budget but rounds W twice: on the bitsandbytes-dequantized weight's oracle it reached
# 1.6-1.95x PyTorch's own error at K = 4096-14336, against the contract's 2x. Strict: a case that starts
# meeting its budgets fails here until it is taken off this list.
NOT_MET = {
    "fwd-16x64x128-w4-s4-M1": "24.6 instructions per element (budget 3): the select-tree lookup, no table loads",
    "fwd-16x32x128-w4-s4-M1": "28.6 per element (budget 3): the select-tree lookup, no table loads",
    "fwd-128x128x64-w8-s3-M512": "24.6 per element (budget 4.5), select-tree lookup, waits on each HGMMA group",
    "bwd-16x64x128-w4-s4-M16": "8.6 per element (budget 3), code table gathered per element",
    "bwd-128x64x64-w8-s3-M512": "9.5 per element (budget 4.5), code table gathered, waits on each HGMMA group",
}


def _ids():
    out = []
    for direction, cfg, m in CASES:
        cid = sm.case_for("4bit", direction, cfg, m=m)
        out.append((direction, cfg, m, cid, sm.dense_twin(cid) if cid else None))
    return out


class _Counts(dict):
    def __repr__(self):  # keeps failure reports to the budget lines
        return f"<{len(self)} loop counts>"


@pytest.fixture(scope="module")
def counts():
    ids = [i for _, _, _, a, b in _ids() for i in (a, b) if i]
    return _Counts(sm.count_cases(ids, workers=2))


def _params():
    out = []
    for d, c, m in CASES:
        cid = f"{d}-{c.replace(' ', '-')}-M{m}"
        marks = [pytest.mark.xfail(strict=True, reason=NOT_MET[cid])] if cid in NOT_MET else []
        out.append(pytest.param(d, c, m, id=cid, marks=marks))
    return out


@pytest.mark.parametrize("direction,config,m", _params())
def test_decode_budgets(direction, config, m, counts):
    cid = sm.case_for("4bit", direction, config, m=m)
    if cid is None:
        pytest.skip(f"configs.py no longer launches {config} for the 4-bit {direction} GEMM")
    twin = sm.dense_twin(cid)
    assert twin is not None, f"{cid}: no dense case with the same tile to measure the decode against"
    c4, cd = counts[cid], counts[twin]
    assert c4.ok, f"{cid} does not build: {c4.error}"
    assert cd.ok, f"{twin} does not build: {cd.error}"
    results = sm.budgets(c4, cd, direction)
    report = "\n".join(f"  {'ok  ' if b.ok else 'OVER'} {b.name}: {b.text}" for b in results)
    print(f"\n{cid} (triton {c4.triton}), wait depth {c4.wait_depth}:\n{report}")
    failed = [b for b in results if not b.ok]
    assert not failed, f"{cid} (triton {c4.triton}) misses {len(failed)} budget(s):\n{report}"
