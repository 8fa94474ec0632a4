#!/usr/bin/env bash
# Fill .gpu-wheels/ with what a lent GPU machine lacks, here, where PyPI is reachable (the GPU machine reaches no
# network). Its image has torch, transformers, accelerate, tiktoken, timm and pytest, but not omegaconf, diffusers,
# torch-fidelity, importlib-metadata or schedulefree (a core dependency: optimizer=schedulefree); all five are pure
# Python, so one wheel of each serves any Python 3. GPT-2's BPE files for tiktoken are copied beside them. Then carry
# the folder with the check:
#
#   bash benchmarks/gpu/wheels.sh             # once, here (about 5 MB)
#   bash benchmarks/gpu/check.sh              # there, with .gpu-wheels carried along
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
DEST=${GPU_CHECK_WHEELS:-$ROOT/.gpu-wheels}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$DEST"
grep -qx "/.gpu-wheels/" .git/info/exclude 2>/dev/null || echo "/.gpu-wheels/" >> .git/info/exclude
# the versions this checkout is tested with
specs=$("$PY" - <<'EOF'
from importlib.metadata import version
WHEELS = ("omegaconf", "diffusers", "torch-fidelity", "importlib-metadata", "schedulefree")
print(" ".join(f"{n}=={version(n)}" for n in WHEELS))
EOF
)
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" $specs
for d in "${TIKTOKEN_CACHE_DIR:-}" "$ROOT/../shared/data/tiktoken-cache"; do
    if [ -n "$d" ] && [ -d "$d" ]; then mkdir -p "$DEST/tiktoken-cache" && cp "$d"/* "$DEST/tiktoken-cache/"; break; fi
done
du -sh "$DEST" && ls "$DEST"
