#!/usr/bin/env bash
# Issue 18 "done means": gpt2 cpu preset, phema tracks 0.05 and 0.10 stored every 25 steps; 0.07 and 0.15 trained
# online as named instances; then the stored tracks reconstruct 0.07 and 0.15 and are scored on the same batches.
set -euo pipefail
. .venv/bin/activate   # run from the repository root
for seed in 0 1 2; do
  out=runs/gpt2-phema-s$seed
  [ -f $out/report.md ] || suite run task=gpt2 preset=cpu seed=$seed averager=phema,phema_c,phema_d \
      phema.sigma_rel=0.05,0.1 phema.snapshot_every=25 phema_c.of=phema phema_c.sigma_rel=0.07 \
      phema_d.of=phema phema_d.sigma_rel=0.15 out=$out progress=false
  rm -rf post/s$seed
  suite average $out averager=phema phema.sigma_rel=0.07,0.15 out=post/s$seed eval=true
done
for seed in 0 1 2; do
  python benchmarks/phema_synthesis.py runs/gpt2-phema-s$seed:post/s$seed:phema_c:0.07 \
      runs/gpt2-phema-s$seed:post/s$seed:phema_d:0.15
done > benchmarks/results/phema-synthesis/results.jsonl
