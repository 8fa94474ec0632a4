#!/usr/bin/env bash
# The GPU check: one unattended command, under 7 minutes on one H100/H200, one Markdown table of every figure the
# suite's GPU goals name (benchmarks/README.md, "GPU check"). Nothing here touches the network.
#
#   bash benchmarks/gpu/check.sh              # on a machine with a GPU; the table also goes to $OUT or
#                                             # benchmarks/results/gpu/ (check.md, check.json, check.log)
#   bash benchmarks/gpu/check.sh --dry-run    # the same parts, tiny, on the CPU through the CUDA stand-in
#
# Python: $PYTHON, else the repo's .venv when its torch imports, else python3. Packages that Python lacks are
# installed from a local wheel folder only ($GPU_CHECK_WHEELS, default .gpu-wheels/, which benchmarks/gpu/wheels.sh
# fills where PyPI is reachable); GPT-2's BPE files for tiktoken come from .gpu-wheels/tiktoken-cache or the
# shared data beside the checkout. The whole check, setting up included, is capped at $GPU_CHECK_BUDGET seconds
# (default 410: with timeout's 10 s grace to kill, under 7 minutes).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1
BUDGET=${GPU_CHECK_BUDGET:-410}
# a dry run on a busy 2-core CPU: minutes more (the smoke's runs and the CUDA tests through the stand-in)
case " $* " in *" --dry-run "*) BUDGET=${GPU_CHECK_BUDGET:-1800} ;; esac
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.gpu-wheels}


PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" >/dev/null 2>&1; then PY=.venv/bin/python
    else PY=python3; fi
fi

missing() {
    "$PY" - <<'EOF'
import importlib.util
need = ["torch", "numpy", "omegaconf", "accelerate", "transformers", "diffusers", "torch_fidelity", "tiktoken",
        "typer", "safetensors", "yaml", "pytest", "schedulefree"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
}
lacking=$(missing)
if [ -n "$lacking" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    SITE=${TMPDIR:-/tmp}/gpu-check-site
    echo "check.sh: $PY lacks: $lacking; installing from $WHEELS (no index)" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl >&2 && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    lacking=$(missing)
fi
[ -n "$lacking" ] && echo "check.sh: still missing: $lacking (the parts that need them will say so)" >&2

if [ -z "${TIKTOKEN_CACHE_DIR:-}" ]; then
    for d in "$WHEELS/tiktoken-cache" "$ROOT/../shared/data/tiktoken-cache"; do
        if [ -d "$d" ]; then export TIKTOKEN_CACHE_DIR=$d; break; fi
    done
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# what setting up took comes off the budget; the driver keeps 20 s of the rest back, and timeout is the backstop
# (TERM: the driver prints what it has)
LEFT=$((BUDGET - SECONDS))
[ "$LEFT" -lt 30 ] && LEFT=30  # setting up took it all: still the table, its rows saying the budget was spent
echo "check.sh: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])')), ${LEFT} s of a ${BUDGET} s budget" >&2
exec timeout --kill-after=10 "$LEFT" "$PY" benchmarks/gpu/check.py --budget "$((LEFT - 20))" "$@"  # --dry-run too
