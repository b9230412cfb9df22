#!/usr/bin/env bash
# Does `pip install fmtransfer` work without the checkout? Builds the wheel, installs it into a fresh venv
# and runs the smoke pipeline with the installed `fmtransfer` command from a folder outside the checkout.
#
#   scripts/check_wheel.sh [extra pipeline overrides ...]
#
# WORK_DIR (default: a new temp folder) receives dist/, venv/ and run/pipeline/report.md. PYTHON (default:
# .venv/bin/python) builds the wheel and lends its installed packages to the new venv as the dependencies,
# so nothing is downloaded; tests/test_wheel.py runs this script.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
work=${WORK_DIR:-$(mktemp -d -t fmtransfer-wheel.XXXXXX)}
mkdir -p "$work" && work=$(cd "$work" && pwd)
start=$(date +%s)

# 1. the wheel, built from a copy of the sources so that the checkout gets no build/ or egg-info
rm -rf "$work/src" "$work/dist" "$work/venv" "$work/run"
mkdir -p "$work/src"
cp "$root/pyproject.toml" "$root/README.md" "$work/src/"
cp -R "$root/fmtransfer" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
"$py" -m pip wheel --quiet --no-deps --no-build-isolation --no-index -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/fmtransfer-*.whl)

# 2. a fresh venv with the wheel; its dependencies come from $py's site-packages through a .pth file, added
# after the install so that pip never sees the checkout's editable fmtransfer there
"$py" -m venv --without-pip "$work/venv"
"$py" -m pip --python "$work/venv/bin/python" install --quiet --no-deps --no-index "$wheel"
site_of() { "$1" -c 'import sysconfig; print(*dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")), sep="\n")'; }
site_of "$py" > "$(site_of "$work/venv/bin/python" | head -n 1)/_fmtransfer_deps.pth"

# 3. the smoke pipeline, from outside the checkout, with nothing pointing back at it (force=true: a 4-step smoke
#    adapter cannot beat its base in the do-no-harm check, and this checks the install, not the adapter)
mkdir -p "$work/run" && cd "$work/run"
clean_env=(env -u PYTHONPATH -u FMTRANSFER_CONFIG_DIR -u FMTRANSFER_CONFIG_PATH "FMTRANSFER_CACHE=$work/cache")
package=$("${clean_env[@]}" "$work/venv/bin/python" -c 'import fmtransfer; print(fmtransfer.__file__)')
echo "fmtransfer imported from: $package"
case "$package" in
    "$work/venv/"*) ;;
    *) echo "error: fmtransfer was imported from $package, not from the installed wheel in $work/venv" >&2; exit 1 ;;
esac
"${clean_env[@]}" "$work/venv/bin/fmtransfer" pipeline experiment=smoke region.limit=200 sweep.sizes=[20] \
    sweep.adapters=[lora] calibration.size=20 'adapt_overrides=["adapter.steps=4"]' \
    export.gates.min_int8_agreement=0 export.gates.max_accuracy_drop=1 export.latency.repeats=2 \
    force=true hydra.run.dir="$work/run/pipeline" "$@"
test -s "$work/run/pipeline/report.md" || { echo "error: no report.md in $work/run/pipeline" >&2; exit 1; }
echo "wheel check passed in $(( $(date +%s) - start )) s: $wheel -> $work/run/pipeline/report.md"
