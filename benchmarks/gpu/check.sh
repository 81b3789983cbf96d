#!/usr/bin/env bash
# The GPU check in one command (docs/gpu.md): the card and its ceilings, every kernel proven
# and timed, the engine against stock diffusers; results in $OUT/results.json, results.md
# and check.log, written after every part. Ends inside 8 minutes.
#
#   bash benchmarks/gpu/check.sh              # on the GPU machine: carry .gpu-wheels, OUT set
#   bash benchmarks/gpu/check.sh --dry-run    # anywhere: CPU, tiny shapes, the reference path
#
# Other options go to the driver: --time-limit SECONDS, --parts ceilings,correctness,...
# Runs the package from the working tree (PYTHONPATH), with the carried wheels installed into
# a temporary folder; nothing is fetched.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELS=${NAI_FAST_GPU_WHEELS:-$REPO/.gpu-wheels}
DRY_RUN=0
for argument in "$@"; do [[ $argument == --dry-run ]] && DRY_RUN=1; done

if [[ -z ${OUT:-} ]]; then
    if ((DRY_RUN)); then OUT=$(mktemp -d /tmp/nai-fast-gpu-dry-run.XXXXXX); else OUT=$REPO/out/gpu-check; fi
fi
mkdir -p "$OUT"
LOG=$OUT/check.log
SITE=$(mktemp -d /tmp/nai-fast-gpu-site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT

say() { echo "[check.sh] $*" | tee -a "$LOG"; }
: >"$LOG"
say "repo $REPO, out $OUT, python $($PYTHON --version 2>&1)"

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]})); then
    say "installing ${#wheels[@]} carried wheels into $SITE"
    if ! $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${wheels[@]}" >>"$LOG" 2>&1; then
        say "pip could not install the carried wheels (see $LOG)"
        ((DRY_RUN)) || exit 2
    fi
else
    say "no wheels in $WHEELS (python3 benchmarks/gpu/fetch_wheels.py fetches them)"
fi

export PYTHONPATH=$REPO:$REPO/benchmarks:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# Tiny CPU work on a shared machine: one thread each, or OpenMP's spinning threads make every
# small op 50 times slower (seen: a tiny U-Net step, 0.13 s on one thread, 6 s on two under load).
((DRY_RUN)) && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ -z ${NAI_FAST_COMMIT:-} ]]; then
    NAI_FAST_COMMIT=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
    git -C "$REPO" diff --quiet HEAD 2>/dev/null || [[ $NAI_FAST_COMMIT == unknown ]] || NAI_FAST_COMMIT="$NAI_FAST_COMMIT+dirty"
fi
export NAI_FAST_COMMIT

# Everything the parts import, before any budget starts.
if ! $PYTHON - >>"$LOG" 2>&1 <<'PY'
import importlib.util
import torch, diffusers, transformers, nai_fast, nai_fast.kernels
assert importlib.util.find_spec("clip") is not None, "openai-clip (the CLIP vocabulary) is not installed"
print("imports:", "torch", torch.__version__, "diffusers", diffusers.__version__, "from", diffusers.__file__)
PY
then
    say "the package or its dependencies do not import (see $LOG)"
    exit 2
fi
if ((!DRY_RUN)) && ! $PYTHON -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    say "no CUDA device here: use --dry-run"
    exit 2
fi

cd "$REPO" || exit 2
$PYTHON -m gpu.check --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
say "done (exit $status): $OUT/results.md"
cat "$OUT/results.md" 2>/dev/null
exit "$status"
