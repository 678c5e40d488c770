"""benchmarks/csrc_model.py (the csrc kernel on the static model) without a GPU: its mirror of the launcher, the
two pipelines' time terms on hand-made loop counts, and the counts of the built library when it is there."""
import glob
import os

import pytest

from benchmarks import csrc_model as cm
from benchmarks.static_model import DEVICES

H200 = DEVICES["H200"]


def variant(pipeline, reach=0, per_step=250.0, regs=80, smem=0, nt=1):
    return cm.Variant(pipeline, "exact", nt, 1, True, False, per_step, None if pipeline == "async" else reach,
                      regs, smem)


def test_plan_mirrors_the_launcher():
    # plan_fast: one wave at about 16 warps per SM; 32-row CTAs for the ring at M > 8 and large N; the async
    # kernel has 16-row CTAs only, and its ring of 4 stages per warp in dynamic shared memory
    assert cm.plan("ring", "exact", 8192, 8192, 1, 16, True, H200) == cm.Launch(1, 1, 512, 4, 0)
    assert cm.plan("ring", "exact", 8192, 8192, 16, 16, True, H200) == cm.Launch(2, 2, 256, 8, 0)
    ln = cm.plan("async", "exact", 8192, 8192, 1, 16, True, H200)
    assert (ln.rt, ln.ctas, ln.warps) == (1, 512, 4)
    # table 32 KB + code2 1040 + 4 warps x 4 stages x (1024 + 256) + bias 64 + LoRA (16 + 1) x 16 x 2
    assert ln.smem == 32768 + 1040 + 4 * 4 * 1280 + 64 + 544
    # M > 8: 32-row CTAs (half the x traffic), 4 warps: 8 warps' rings would leave one CTA per SM (two waves)
    ln = cm.plan("async", "exact", 8192, 8192, 16, 16, True, H200)
    assert (ln.rt, ln.ctas, ln.warps) == (2, 256, 4)
    assert ln.smem == 32768 + 1040 + 4 * 4 * 2 * 1280 + 128 + (32 + 16) * 16 * 2
    assert cm.plan("async", "registers", 8192, 8192, 1, 96, True, H200).smem == 1040 + 4 * 4 * 1280 + 64  # r > 64
    # 14336 rows at M = 1: 16-row CTAs cannot all be resident with the table; 32-row ones can (2 warps)
    ln = cm.plan("async", "exact", 14336, 4096, 1, 16, True, H200)
    assert (ln.rt, ln.ctas, ln.warps) == (2, 448, 2)


def test_serial_ring_pays_a_round_trip_per_step():
    ln = cm.plan("ring", "exact", 8192, 8192, 1, 0, True, H200)
    serial, bound, _ = cm.kernel_time(variant("ring", reach=0, smem=33792, regs=123), ln, 8192, 8192, 1, 0, H200)
    steps = 8192 // 128 // ln.warps
    assert bound.startswith("serial") and serial > steps * cm.MEM_LATENCY_S
    # the same loop reaching a step ahead is pipelined and bounded by issue or HBM instead
    ahead, bound2, _ = cm.kernel_time(variant("ring", reach=8, smem=33792, regs=123), ln, 8192, 8192, 1, 0, H200)
    assert ahead < serial and bound2 in ("issue", "hbm", "l2", "latency")


def test_async_bounds():
    ln = cm.plan("async", "exact", 8192, 8192, 1, 16, True, H200)
    t, bound, _ = cm.kernel_time(variant("async", per_step=260), ln, 8192, 8192, 1, 16, H200)
    floor = cm.floor_s(8192, 8192, 1, 16, H200)
    assert bound in ("issue", "hbm") and floor < t < 2 * floor
    # at M = 16 with 16-row CTAs x comes from L2 once per 16 rows: 4 bytes per packed byte, more than HBM's
    ln16 = cm.Launch(1, 2, 512, 4, cm.async_smem("exact", True, 1, 4, 16, 16))
    _, bound16, _ = cm.kernel_time(variant("async", per_step=280, nt=2), ln16, 8192, 8192, 16, 16, H200)
    assert bound16 == "l2"


def test_counts_of_the_built_library():
    so = sorted(glob.glob(os.path.join(os.path.dirname(cm.__file__), "..", "lora_kernels", "_csrc*.so")))
    if not so:
        pytest.skip("lora_kernels/_csrc*.so is not built (.ci/csrc.sh builds it)")
    try:
        variants = cm.count_library(so[0])
    except FileNotFoundError as e:
        pytest.skip(f"no cuobjdump: {e}")
    ring = variants[("ring", "exact", 1, 1, True, False)]
    fast = variants[("async", "exact", 1, 1, True, False)]
    assert ring.serial and ring.reach == 0  # what the H200 depth sweep showed: the ring's prefetch does not reach
    assert not fast.serial and fast.reach is None
    assert 150 < ring.per_step < 320 and 150 < fast.per_step < 320


@pytest.mark.parametrize("n,k,m", [(8192, 8192, 1), (8192, 8192, 16), (4096, 14336, 1), (14336, 4096, 16)])
def test_no_prediction_beats_the_read_only_bound(n, k, m):
    """The read-only bound is what a kernel that only streams the bytes would take on the same model: above the
    floor by the reached bandwidth, the ramp and a round trip (1.33x at 8192x8192 on the H200), and below every
    kernel's prediction."""
    floor, bound = cm.floor_s(n, k, m, 16, H200), cm.read_bound_s(n, k, m, 16, H200)
    assert bound > floor * H200.hbm_peak / H200.hbm_reached
    nt = 2 if m > 8 else 1
    for pipeline in ("ring", "async"):
        ln = cm.plan(pipeline, "shared", n, k, m, 16, True, H200)
        for per_step in (60.0, 250.0):  # an implausibly cheap loop, and a realistic one
            v = cm.Variant(pipeline, "shared", nt, ln.rt, True, False, per_step * nt * ln.rt,
                           None if pipeline == "async" else 8 * nt * ln.rt, 80, 33792)
            t, _, _ = cm.kernel_time(v, ln, n, k, m, 16, H200)
            assert t >= bound, (pipeline, per_step, t, bound)
