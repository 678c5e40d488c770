"""benchmarks/static_model.py without compiling anything: the SASS counter on a hand-written loop, the time
model on a known loop, and predicted rows kept out of every measured table and plot."""
import pytest

from benchmarks import static_model as sm
from lora_kernels.bench import plot, report, results

SASS = """
        /*0100*/                   MOV R1, c[0x0][0x28] ;
        /*0110*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0120*/                   LDS R6, [R7] ;
        /*0130*/                   PRMT R8, R6, 0x7610, R8 ;
        /*0140*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0150*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0160*/                   F2FP.BF16.F32.PACK_AB R9, R10, R11 ;
        /*0170*/              @!P5 BRA 0x110 ;
        /*0180*/                   EXIT ;
        /*0190*/                   BRA 0x190;
"""


def test_sass_loop_classes_and_wait_depth():
    instrs = sm.parse_sass(SASS)
    loop = sm.main_loop(sm.find_loops(instrs))
    assert (loop.start, loop.end, len(loop.instrs)) == (0x110, 0x170, 7)  # the trap `BRA 0x190` is no loop
    classes = {}
    for i in loop.instrs:
        classes[i.cls] = classes.get(i.cls, 0) + 1
    assert classes == {"async": 1, "lds": 1, "prmt": 1, "tensor": 1, "barrier": 1, "cvt": 1, "control": 1}
    assert sm.mma_shape(loop.instrs[3])[:3] == (64, 128, 16)
    lsu, operands, fma = sm._smem_and_fma(loop.instrs, 8)  # 8 warps: 2 warpgroups
    assert fma == 64 * 128 * 16 * 2 and operands == (128 * 16 * 2 + 64 * 16 * 2) * 2
    assert lsu == (16 * 32 + 4 * 32) * 8


def _count(per_iter, wait, regs=120, shared=98304):
    return sm.LoopCount(id="x", kernel="k", mode="fwd", config="128x128x64 w8 s3", block=(128, 128, 64),
                        num_warps=8, regs=regs, shared=shared, per_iter=per_iter, wait_depth=wait,
                        smem_bytes=32768, hgmma_smem_bytes=49152, tensor_fma=128 * 128 * 64)


def test_time_model_dense_on_its_roofline_and_a_waiting_decode_serialized():
    dev = sm.DEVICES["H100"]
    assert 0.75 < sm.tensor_efficiency(dev) < 0.82  # cuBLAS's measured 780 of the datasheet's 989 TFLOP/s
    assert sm.occupancy(_count(110, 1), dev) == 2 and sm.occupancy(_count(110, 1, regs=171), dev) == 1
    m = n = k = 8192
    ctas = (m // 128) * (n // 128)
    dense = sm.loop_kernel_time("dense", _count(110, 1), dev, ctas=ctas, iters=k // 64, hbm_bytes=0)
    assert dense.bound == "tensor"
    assert dense.seconds == pytest.approx(2 * m * n * k / dev.cublas_flops, rel=0.08)
    slow = sm.loop_kernel_time("4bit", _count(360, 0, regs=171), dev, ctas=ctas, iters=k // 64, hbm_bytes=0)
    assert slow.bound == "serial" and slow.seconds > 1.8 * dense.seconds  # decode + MMA, one CTA per SM
    floor = sm.memory_floor(8192, 8192, dev)
    assert floor == pytest.approx(8192 * 8192 * (0.5 + 4 / 64) / 3.35e12)


def _rows():
    env = dict(gpu="NVIDIA H100 80GB HBM3", torch="2.11.0", triton="3.6.0", commit="abc", date="2026-01-01T00:00:00Z")
    measured = [results.make_row("layer_fwd", p, 8192, 4096, 4096, r, "bf16", (ms, ms, ms), 100.0, env)
                for p, r, ms in (("lora_kernels", 16, 1.0), ("cublas_bf16", 0, 0.5))]
    pred_env = dict(env, gpu="H100 SXM (static model, predicted)")
    predicted = [dict(results.make_row("layer_fwd", p + sm.PREDICTED, 8192, 4096, 4096, r, "bf16",
                                       (ms, 0.0, 0.0), None, pred_env), ms_p20=None, ms_p80=None)
                 for p, r, ms in (("lora_kernels", 16, 0.1), ("cublas_bf16", 0, 9.0))]
    return measured, predicted


def test_predicted_rows_never_enter_a_measured_table(tmp_path):
    measured, predicted = _rows()
    assert all(map(results.is_predicted, predicted)) and not any(map(results.is_predicted, measured))
    text = report.speedup_table(measured + predicted)  # the predicted rows come last: newest, other "gpu"
    assert "NVIDIA H100 80GB HBM3" in text and "predicted" not in text
    line = next(ln for ln in text.splitlines() if ln.startswith("4096x4096"))
    assert "1.000" in line and "0.50x" in line  # the measured lora_kernels and cublas_bf16, not the predictions
    only = report.speedup_table(predicted)
    assert only.startswith("no measured rows (2 predicted rows") and "no measurements" in only
    path = tmp_path / "static.csv"
    results.append_csv(str(path), predicted)
    back = results.read_csv(str(path))
    assert all(r["ms_p20"] is None and r["ms_p80"] is None and r["peak_mem_mb"] is None for r in back)
    assert all(map(results.is_predicted, back))
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="no measured rows"):
        plot.plot_rows(back, str(tmp_path / "p.png"))
