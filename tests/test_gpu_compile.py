"""Every Triton kernel of the package, compiled for H100 (sm_90) and A100 (sm_80) on a CPU machine.

For each kernel, launch mode, dtype and autotune config the package can launch on each arch
(tests/_gpu_compile.py lists them: every GEMM config that configs.config_allowed keeps for some M bucket,
configs.epilogue_config for the BASE=0 epilogue, configs.lora_config for the rank kernels, BLOCK=1024 for
dequantization), this builds PTX and a cubin with triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32)) and asserts that:

- it builds;
- metadata.shared fits the per-block opt-in maximum (227 KiB on H100, 163 KiB on A100);
- nothing spills: ptxas -v reports 0 bytes of spill stores/loads and cuobjdump --dump-resource-usage
  STACK:0 LOCAL:0;
- the SASS uses tensor cores: HGMMA on sm_90 for BLOCK_M >= 64, HMMA or HGMMA for BLOCK_M = 16, HMMA on
  sm_80; fp32 operands must not (common.mma asks for exact ieee products: FFMA).

Arguments are specialized as triton's launcher specializes a realistic launch (16-byte aligned pointers,
unit strides as constexpr 1, 4096-sized extents divisible by 16). The compilation runs in a subprocess
without TRITON_INTERPRET (conftest.py sets it in this process, which would make the kernels interpreted
functions), with a fresh TRITON_CACHE_DIR and two worker processes. `pytest -s` prints the table.

A finding this test makes goes into KNOWN as a strict xfail (the case must fail exactly the listed checks;
a fix (XPASS) or a different failure fails the test) until configs.py stops launching it. The findings of
its first run (odd-K 4-bit tiles over 64x64, every fp32 GEMM / rank / epilogue config sized for 16-bit
operands, one sm_80 4-bit backward tile) were fixed that way: KNOWN is empty.
"""
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import _gpu_compile as gc

pytestmark = pytest.mark.slow

CASES = gc.cases()
HELPER = Path(gc.__file__)

# (id pattern (fnmatch), checks that fail, why). First match wins. Every entry is a finding of this test
# (triton 3.9.0, its bundled ptxas); "*16" matches bf16 and fp16. Empty: every launchable config is clean.
KNOWN = []


class KnownFinding(AssertionError):
    """A case failed exactly the checks KNOWN lists for it."""


def _known(case):
    for pattern, checks, why in KNOWN:
        if fnmatch.fnmatchcase(case["id"], pattern):
            return frozenset(checks), why
    return None


def _marks(case):
    known = _known(case)
    if known is None:
        return ()
    return (pytest.mark.xfail(strict=True, raises=KnownFinding, reason=f"{'+'.join(sorted(known[0]))}: {known[1]}"),)


def _missing_tools():
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return [f"triton's NVIDIA backend ({type(e).__name__}: {e})"]
    return [name for name in ("ptxas", "ptxas-blackwell", "cuobjdump")
            if not os.access(gc.TOOLS / name, os.X_OK)]


def _failed_checks(case, res):
    """{check: message} for every assertion the compiled case fails."""
    if res is None:
        return {"build": "no result from the compile helper"}
    if not res["ok"]:
        return {"build": res["error"]}
    failed = {}
    limit = gc.ARCHS[case["arch"]]
    if res["shared"] > limit:
        failed["shared"] = f"metadata.shared {res['shared']} B > {limit} B on sm_{case['arch']}"
    if res["spill_stores"] or res["spill_loads"] or res["stack"] or res["local"]:
        failed["spill"] = (f"ptxas: {res['spill_stores']} B spill stores, {res['spill_loads']} B spill loads; "
                           f"cuobjdump: REG:{res['regs']} STACK:{res['stack']} LOCAL:{res['local']}")
    want, hg, hm = case["tensor_core"], res["hgmma"], res["hmma"]
    ok = {"HGMMA": hg > 0, "HMMA": hm > 0, "any": hg + hm > 0, "none": hg + hm == 0, None: True}[want]
    if not ok:
        failed["tensor-core"] = f"expected {want} tensor-core instructions, SASS has HGMMA x{hg}, HMMA x{hm}"
    return failed


def _tc_text(res):
    if res.get("hgmma"):
        return f"HGMMA x{res['hgmma']}"
    if res.get("hmma"):
        return f"HMMA x{res['hmma']}"
    return f"none (FFMA x{res.get('ffma', 0)})"


def _table(cases, results):
    head = ("kernel", "mode", "dtype", "config", "arch", "shared B", "regs", "spill st/ld B", "tensor-core", "result")
    rows = []
    for c in cases:
        res = results.get(c["id"])
        failed = _failed_checks(c, res)
        known = _known(c)
        status = "ok" if not failed else ("known: " if known and set(failed) == known[0] else "FAIL: ") + \
            "+".join(sorted(failed))
        row = (c["kernel"], c["mode"], c["dtype"], c["config"], f"sm_{c['arch']}")
        if res is None or not res["ok"]:
            rows.append((*row, "-", "-", "-", "-", status))
        else:
            rows.append((*row, str(res["shared"]), str(res["regs"]), f"{res['spill_stores']}/{res['spill_loads']}",
                         _tc_text(res), status))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [head, *rows])


@pytest.fixture(scope="module")
def compiled(request):
    """{case id: result} for the cases of this module that this session runs, compiled in one subprocess."""
    missing = _missing_tools()
    if missing:
        pytest.skip("triton install lacks " + ", ".join(missing) + f" (looked in {gc.TOOLS})")
    wanted = {item.callspec.params["case"]["id"] for item in request.session.items
              if getattr(item, "module", None) is sys.modules[__name__] and hasattr(item, "callspec")
              and "case" in item.callspec.params}
    cases = [c for c in CASES if c["id"] in wanted]
    cache = tempfile.mkdtemp(prefix="lk-gpu-compile-")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "LORA_KERNELS_BACKEND", "TRITON_CACHE_DIR")}
    env["TRITON_CACHE_DIR"] = cache  # nothing cached across runs
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, set to quiet its warning
    try:
        run = subprocess.run([sys.executable, str(HELPER), "-"], input=json.dumps([c["id"] for c in cases]),
                             capture_output=True, text=True, env=env, cwd=str(gc.ROOT), timeout=1500)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    results = {}
    for line in run.stdout.splitlines():
        if line.startswith("{"):
            res = json.loads(line)
            results[res["id"]] = res
    if run.returncode != 0 or len(results) != len(cases):
        pytest.fail(f"compile helper exited {run.returncode} with {len(results)}/{len(cases)} results:\n"
                    f"{run.stderr[-4000:]}")
    print("\n" + _table(cases, results))
    return results


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"], marks=_marks(c)) for c in CASES])
def test_kernel_builds_fits_no_spill_tensor_cores(case, compiled):
    failed = _failed_checks(case, compiled.get(case["id"]))
    known = _known(case)
    if failed and known is not None and set(failed) == known[0]:
        raise KnownFinding("; ".join(f"{k}: {v}" for k, v in failed.items()))
    assert not failed, f"{case['id']}: " + "; ".join(f"{k}: {v}" for k, v in failed.items())


def test_known_findings_name_real_cases():
    """Every KNOWN pattern matches some case, so the list cannot go stale silently."""
    for pattern, checks, _ in KNOWN:
        assert any(fnmatch.fnmatchcase(c["id"], pattern) for c in CASES), pattern
        assert set(checks) <= {"build", "shared", "spill", "tensor-core"}, checks


GEMM_KERNELS = {"fused_linear/dense", "fused_linear/4bit", "qlora_fwd", "qlora_dx"}


def test_cases_cover_every_kernel_and_config():
    kernels = {c["kernel"] for c in CASES}
    assert kernels == GEMM_KERNELS | {"fused_linear/epilogue", "lora_down", "lora_grad_a", "dequantize_4bit"}
    assert {c["arch"] for c in CASES} == {80, 90}
    from lora_kernels.ops.common import rank_block

    assert all(gc._rank_block(r, cap) == rank_block(r, cap) for r in (1, 8, 16, 17, 64, 128) for cap in (32, 64))
    assert len({c["id"] for c in CASES}) == len(CASES)
    cfgs = gc.configs
    for dt, size in gc.DTYPES.items():  # every config a launch kind can draw is compiled, for every arch
        for kernel, kind in (("fused_linear/dense", "dense"), ("fused_linear/4bit", "4bit_odd"),
                             ("qlora_fwd", "qlora_fwd"), ("qlora_dx", "qlora_dx")):
            for arch in gc.ARCHS:
                drawable = {f"{bm}x{bn}x{bk} w{w} s{s}" for bm, bn, bk, w, s in cfgs.all_gemm_configs()
                            if any(cfgs.config_allowed(bm, bn, bk, w, s, m=m, kind=kind, dtype_bytes=size,
                                                       dropout=drop, arch=arch, aligned=aligned)
                                   for m in (1, 16, 256, 512, 8192) for drop in (False, True)
                                   for aligned in (True, False))}
                seen = {c["config"] for c in CASES if c["kernel"] == kernel and c["dtype"] == dt and c["arch"] == arch}
                assert seen == drawable, (kernel, dt, arch, drawable ^ seen)


@pytest.mark.parametrize("arch", [None, *gc.ARCHS])
def test_every_launch_keeps_a_gemm_candidate(arch):
    """prune_for raises when nothing fits: each (M bucket, dtype, launch kind, dropout, arch) the launcher can
    produce keeps at least one config, M <= 16 keeps only 16-row tiles, and above M = 256 every 16-bit launch
    keeps a tensor-core tile whose MMA has at least 64 rows (HGMMA on sm_90)."""
    from lora_kernels.ops import configs

    for m in (1, 2, 16, 17, 64, 256, 257, 512, 2048, 8192, 100000):
        for dtype_bytes in (2, 4):
            for kind in configs.KINDS:
                for dropout in ((False, True) if kind in ("dense", "4bit_odd", "qlora_dx") else (False,)):
                    for aligned in (True, False):
                        keep = [c for c in configs.all_gemm_configs()
                                if configs.config_allowed(*c, m=m, kind=kind, dtype_bytes=dtype_bytes,
                                                          dropout=dropout, arch=arch, aligned=aligned)]
                        assert keep, (m, dtype_bytes, kind, dropout, arch, aligned)
                        if m <= 16:
                            assert all(c[0] == 16 for c in keep), keep
                        if m > 256 and dtype_bytes == 2:
                            mma_rows = [c[1] if kind == "qlora_fwd" else c[0] for c in keep]
                            assert max(mma_rows) >= 64, (m, kind, dropout, arch, keep)


def test_prune_reads_the_arch_from_cuda_tensors_only():
    """Off CUDA (CPU tensors, the interpreter) no arch rule applies; the same launch keeps the same configs."""
    import torch

    from lora_kernels.ops import configs

    assert configs.device_arch(torch.empty(1)) is None
    assert configs.device_arch(None) is None
    named = dict(M=4096, K=4096, out_ptr=torch.empty(1))
    kwargs = dict(DTYPE_BYTES=2, BS_SHIFT=6)
    kept = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            for c in configs.prune_for("qlora_fwd")(configs.gemm_configs(), named, **kwargs)}
    assert kept == {c for c in configs.GEMM_CONFIGS if c[0] != 16}
    sm80 = {c for c in kept if configs.config_allowed(*c, m=4096, kind="qlora_fwd", arch=80)}
    assert kept - sm80 == {c for c in kept if configs.spill_prune("qlora_fwd", c, arch=80, dtype_bytes=2, dropout=False)}
    assert kept - sm80  # (64, 128, 64, 4, 4) spills on sm_80


def test_dx_prefers_tiles_inside_one_scale_block():
    """dx tiles no wider than the blocksize read one scale per row of W and step; wider ones gather one per
    byte. With K a multiple of the blocksize the autotuner gets only the former, unless none fits."""
    import torch

    from lora_kernels.ops import configs

    def kept(k, bs_shift):
        named = dict(M=4096, K=k, dx_ptr=torch.empty(1))
        return {c.kwargs["BLOCK_N"] for c in configs.prune_for("qlora_dx")(configs.gemm_configs(), named,
                                                                           DTYPE_BYTES=2, BS_SHIFT=bs_shift)}

    assert kept(4096, 6) == {64}  # blocksize 64: only 64-wide tiles
    assert 128 in kept(4096 + 32, 6)  # not aligned: per-byte scales anyway, every width
    assert kept(4096, 5)  # blocksize 32: no tile fits, so all are kept rather than none


def test_specialization_matches_triton_launcher():
    """The helper specializes args as triton's own launcher does (1 -> constexpr, multiples of 16 -> divisible)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError as e:
        pytest.skip(f"triton's launcher specialization is not importable here: {e}")
    fake = SimpleNamespace(arg_names=["v"], __name__="fake")
    for value in (1, 0, 16, 4096, 4095, 64, 12347, 16777216, 0.5, 0.0):
        kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        sig, consts, attrs = gc.specialize(fake, [value], {})
        assert sig["v"] == kind, (value, sig, kind)
        if kind == "constexpr":
            assert consts == {"v": attr}
        else:
            assert (attrs.get((0,)) == [["tt.divisibility", 16]]) == (attr == "D"), (value, attrs, attr)


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in CASES if c["kernel"] == "dequantize_4bit"])
def test_dequantize_keeps_bitsandbytes_roundings(case, compiled):
    """No FFMA in the dequantize kernel: the nested scale is a product and then a sum, each rounded, as in
    bitsandbytes (dequant.add_rn). Contracted into an FMA, fp16 weights differed from bitsandbytes' on an H200."""
    res = compiled.get(case["id"])
    assert res and res["ok"], res
    assert res["ffma"] == 0, f"{case['id']}: {res['ffma']} FFMA"
