#!/usr/bin/env bash
# CI leg: PEFT's own LoRA tests, run twice, as they are and with every model PEFT injects adapters into patched
# by lora_kernels (.ci/peft_plugin.py hooks BaseTuner.inject_adapter). Fails when a test passes stock and fails
# patched, or when no test ran the fused op; prints the counts.
#
# Runs inside the activated project venv (the package installed with the dev extra). Downloads PEFT's sdist for
# the installed version (its tests/ are not in this repository) and installs the test requirements PEFT's tests
# import that the dev extra lacks, constrained to the versions already installed. Measured: 13 minutes on 2 shared
# cores (download and install ~1 min, then ~6 min per run).
#
# Environment: LK_PEFT_WORK (work directory, default a temporary one), LK_PEFT_WORKERS (pytest-xdist workers,
# default 2), LK_PEFT_SELECT (override the node-id regex below).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=${LK_PEFT_WORK:-$(mktemp -d -t lk-peft-suite.XXXXXX)}
mkdir -p "$work"
start=$(date +%s)

ver=$(python -c "from importlib.metadata import version; print(version('peft'))")  # no import: bitsandbytes logs
echo "peft suite: PEFT $ver, work directory $work"
rm -rf "$work/sdist" "$work/peft-$ver"
pip download --quiet --no-deps --no-binary :all: "peft==$ver" -d "$work/sdist"
tar -xzf "$work/sdist/peft-$ver.tar.gz" -C "$work"
src="$work/peft-$ver"
if [ ! -f "$src/tests/test_custom_models.py" ]; then
    echo "peft suite: the sdist of peft $ver has no tests/test_custom_models.py" >&2
    exit 1
fi
touch "$src/tests/__init__.py"  # the sdist leaves it out; its tests import each other relatively

# What PEFT's test modules import beyond the dev extra (attrs: peft.tuners.lora.corda imports `attr`). Installed
# packages keep their versions (torch above all): a requirement that would change one fails here, saying so.
pip freeze --exclude-editable | grep -v " @ " > "$work/constraints.txt"
pip install --quiet -c "$work/constraints.txt" diffusers datasets parameterized scipy attrs pytest-xdist

# LoRA tests only (not other tuners), none that need the hub: test_custom_models' LoraConfig cases, the LoRA test
# files, and the LoRA tests of the files that mix tuners. test_decoder_models & co. download models: left out.
files=(tests/test_custom_models.py tests/test_lora_variants.py tests/test_lora_intruders.py
       tests/test_lora_conversion.py tests/test_lora_ga.py tests/test_loraplus.py tests/test_lorafa.py
       tests/test_initialization.py tests/test_target_parameters.py tests/test_low_level_api.py tests/test_mixed.py
       tests/test_tuners_utils.py tests/test_other.py)
export LK_PEFT_SELECT=${LK_PEFT_SELECT:-'^tests/test_custom_models\.py::.*-LoraConfig-|^tests/test_(lora_variants|lora_intruders|lora_conversion|lora_ga|loraplus|lorafa)\.py::|^tests/test_(initialization|target_parameters|low_level_api|mixed|tuners_utils|other)\.py::.*(?i:lora)'}
# The hub is unreachable in CI: a test that needs it fails fast and the plugin reports it skipped. On CPU the patch
# leaves layers on PEFT's forward by default; LORA_KERNELS_PATCH_CPU=op makes them run the op, which is the point.
export HF_HUB_OFFLINE=1 LORA_KERNELS_PATCH_CPU=op PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"

run() {  # run MODE: pytest over the selection; exit status 1 (some tests failed) is for the comparison to judge
    local mode=$1 rc=0
    (cd "$src" && LK_PEFT_MODE=$mode LK_PEFT_OUT="$work/$mode.json" python -m pytest "${files[@]}" -p peft_plugin \
        -p no:cacheprovider -o addopts= -q --disable-warnings -n "${LK_PEFT_WORKERS:-2}") > "$work/$mode.log" 2>&1 || rc=$?
    echo "peft suite: $mode run: $(tail -n 1 "$work/$mode.log") (pytest exit $rc; log $work/$mode.log)"
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; then
        tail -n 40 "$work/$mode.log" >&2
        echo "peft suite: the $mode run did not complete (pytest exit status $rc)" >&2
        exit 1
    fi
}

run stock
run patched
rc=0
python "$here/peft_plugin.py" compare "$work/stock.json" "$work/patched.json" || rc=$?
echo "peft suite: $(( $(date +%s) - start )) s in all"
exit $rc
