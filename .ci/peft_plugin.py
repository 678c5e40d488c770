"""pytest plugin for running PEFT's own test suite against lora_kernels' patch (.ci/peft_suite.sh).

Loaded into PEFT's tests with `-p peft_plugin` (this directory on PYTHONPATH). Environment:

    LK_PEFT_MODE=stock|patched   patched: every model PEFT injects adapters into (BaseTuner.inject_adapter, which
                                 get_peft_model, add_adapter, PeftModel.from_pretrained and inject_adapter_in_model
                                 all go through) is patched with lora_kernels.patch_peft_model right after
    LK_PEFT_SELECT=REGEX         keep only tests whose node id matches (re.search, case-sensitive)
    LK_PEFT_OUT=PATH             where to write {node id: {"outcome": ..., "fused": bool}} as JSON

"fused" says that the fused op ran at least once in the test. A test that fails only because the hub is
unreachable (HF_HUB_OFFLINE=1 in CI) is reported as skipped: it cannot run here, patched or not.

    python .ci/peft_plugin.py compare STOCK.json PATCHED.json

prints the counts and exits 1 when a test passed stock and failed patched, or when no test ran the fused op.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import sys

import pytest

_STATE = {"fused": False, "reasons": set()}
_HUB_ERRORS = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "RepositoryNotFoundError", "GatedRepoError")
_HUB_TEXT = ("offline mode is enabled", "HF_HUB_OFFLINE", "couldn't connect to 'https://huggingface.co'",
             "cannot find the requested files in the local cache", "outgoing traffic has been disabled")


def _mode():
    mode = os.environ.get("LK_PEFT_MODE", "stock")
    if mode not in ("stock", "patched"):
        raise pytest.UsageError(f"LK_PEFT_MODE={mode!r} is not 'stock' or 'patched'")
    return mode


def _install_patch():
    """Patches every model right after PEFT injects adapters into it; notes each call of the fused op."""
    from peft.tuners.tuners_utils import BaseTuner

    import lora_kernels as lk
    from lora_kernels.ops import fused_linear

    inject = BaseTuner.inject_adapter

    def inject_and_patch(self, model, *args, **kwargs):
        out = inject(self, model, *args, **kwargs)
        try:
            lk.patch_peft_model(model)
        except ValueError as exc:  # another tuner's adapters: nothing to patch
            if "no PEFT LoRA layers" not in str(exc):
                raise
        return out

    BaseTuner.inject_adapter = inject_and_patch
    run = fused_linear._run

    def run_and_note(*args, **kwargs):
        _STATE["fused"] = True
        return run(*args, **kwargs)

    fused_linear._run = run_and_note
    from lora_kernels import patch

    fallback = patch._fallback

    def fallback_and_note(self, reason, *args, **kwargs):
        _STATE["reasons"].add(f"fallback: {reason}")
        return fallback(self, reason, *args, **kwargs)

    patch._fallback = fallback_and_note
    patch_model = patch.patch_peft_model

    def patch_and_note(model):
        report = patch_model(model)
        _STATE["reasons"].update(f"skipped: {r}" for r in report.skipped.values())
        return report

    patch.patch_peft_model = patch_and_note
    lk.patch_peft_model = patch_and_note


class _NoBackoffTime:
    """`time` for huggingface_hub's HTTP module without its retry back-off: offline, every retry fails the same."""

    def __getattr__(self, name):
        import time

        return getattr(time, name)

    @staticmethod
    def sleep(seconds):
        return None


def pytest_configure(config):
    config._lk_results = {}
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        try:
            from huggingface_hub.utils import _http
        except ImportError:
            pass
        else:
            _http.time = _NoBackoffTime()
    if _mode() == "patched":
        _install_patch()


# Source text of a test (or of a fixture it uses) that reaches the hub: PEFT's hub_online_once lets the first access
# go online whatever HF_HUB_OFFLINE says, and huggingface_hub then retries with back-off for ~20 s per request.
_HUB_SOURCE = re.compile(r"hub_online_once|from_pretrained\(\s*[\"'][\w.-]+/[\w.-]+[\"']|[\"'](hf|peft|trl)-internal-testing/")
_HUB_ID = re.compile(r"(hf|peft|trl)-internal-testing/|[\w-]+/tiny-")


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _uses_hub(item) -> bool:
    if _HUB_ID.search(item.nodeid):
        return True
    funcs = [getattr(item, "function", None)]
    for defs in getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}).values():
        funcs.extend(d.func for d in defs)
    return any(f is not None and _HUB_SOURCE.search(_source(f)) for f in funcs)


def pytest_collection_modifyitems(session, config, items):
    """Keeps the tests LK_PEFT_SELECT matches and, of those, the ones that do not reach the hub."""
    pattern = os.environ.get("LK_PEFT_SELECT")
    regex = re.compile(pattern) if pattern else None
    keep, drop, hub = [], [], 0
    for item in items:
        if regex is not None and not regex.search(item.nodeid):
            drop.append(item)
        elif os.environ.get("HF_HUB_OFFLINE") == "1" and _uses_hub(item):
            drop.append(item)
            hub += 1
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    if hub:
        print(f"\nlk: left out {hub} selected test(s) that reach the Hugging Face hub")


def pytest_runtest_setup(item):
    _STATE["fused"] = False
    _STATE["reasons"] = set()


def _needs_hub(excinfo) -> bool:
    exc, seen = excinfo.value, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in _HUB_ERRORS or any(t.lower() in str(exc).lower() for t in _HUB_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and report.failed and _needs_hub(call.excinfo):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, "lk: needs the Hugging Face hub (offline)")
    if call.when == "call":
        if _STATE["fused"]:
            report.user_properties.append(("lk_fused", True))
        for reason in sorted(_STATE["reasons"]):
            report.user_properties.append(("lk_reason", reason))


def pytest_runtest_logreport(report):
    """Runs where the results are gathered (the controller under xdist): one entry per test, its worst phase."""
    config = _CONFIG.get("config")
    if config is None:
        return
    entry = config._lk_results.setdefault(report.nodeid, {"outcome": "passed", "fused": False, "reasons": []})
    for key, value in report.user_properties:
        if key == "lk_fused":
            entry["fused"] = True
        elif key == "lk_reason" and value not in entry["reasons"]:
            entry["reasons"].append(value)
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and entry["outcome"] != "failed":
        entry["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"


_CONFIG = {}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    _CONFIG["config"] = session.config


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller writes the file
        return
    path = os.environ.get("LK_PEFT_OUT")
    if path:
        with open(path, "w") as fh:
            json.dump(session.config._lk_results, fh, indent=0, sort_keys=True)


# ------------------------------------------------------------------------------------------ comparison

def compare(stock: dict, patched: dict) -> tuple[dict, list]:
    """(counts, regressions): regressions are the tests that passed stock and did not pass patched."""
    regressions = sorted(n for n, r in stock.items()
                         if r["outcome"] == "passed" and patched.get(n, {}).get("outcome") != "passed")
    fixed = sorted(n for n, r in stock.items()
                   if r["outcome"] == "failed" and patched.get(n, {}).get("outcome") == "passed")
    counts = {
        "tests": len(stock),
        "passed both": sum(1 for n, r in stock.items()
                           if r["outcome"] == "passed" and patched.get(n, {}).get("outcome") == "passed"),
        "failed both": sum(1 for n, r in stock.items()
                           if r["outcome"] == "failed" and patched.get(n, {}).get("outcome") == "failed"),
        "failed only patched": len(regressions),
        "failed only stock": len(fixed),
        "skipped (stock)": sum(1 for r in stock.values() if r["outcome"] in ("skipped", "xfailed")),
        "missing from the patched run": sum(1 for n in stock if n not in patched),
        "ran the fused op (patched)": sum(1 for r in patched.values() if r.get("fused")),
        "passed and ran the fused op": sum(1 for r in patched.values() if r.get("fused") and r["outcome"] == "passed"),
    }
    return counts, regressions


def main(argv) -> int:
    if len(argv) != 3 or argv[0] != "compare":
        print("usage: python .ci/peft_plugin.py compare STOCK.json PATCHED.json", file=sys.stderr)
        return 2
    with open(argv[1]) as fh:
        stock = json.load(fh)
    with open(argv[2]) as fh:
        patched = json.load(fh)
    if not stock:
        print("peft suite: the stock run recorded no test", file=sys.stderr)
        return 1
    counts, regressions = compare(stock, patched)
    width = max(len(k) for k in counts)
    for key, value in counts.items():
        print(f"  {key:<{width}}  {value}")
    reasons = {}
    for r in patched.values():
        if not r.get("fused"):
            for reason in r.get("reasons", ()):
                reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        print("  why patched tests did not run the fused op (tests per reason, most common first):")
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])[:12]:
            print(f"    {count:5d}  {reason[:150]}")
    for name in regressions[:50]:
        print(f"  REGRESSION (passed stock, {patched.get(name, {}).get('outcome', 'missing')} patched): {name}")
    if regressions:
        print(f"peft suite: {len(regressions)} test(s) pass with stock PEFT and fail patched", file=sys.stderr)
        return 1
    if counts["ran the fused op (patched)"] == 0:
        print("peft suite: no test ran the fused op: the patch was not applied", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
