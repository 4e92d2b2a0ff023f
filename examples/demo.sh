#!/usr/bin/env bash
# The main job on the bundled demo (run by `make demo`): make AST-shaped data, validate and migrate a
# legacy config, train a small generator, generate full-length samples, inspect and evaluate them.
# Everything lands in $DEMO_OUT (default: demo-out/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo-out}
rm -rf "$OUT"
mkdir -p "$OUT"
# bold headings on a terminal only: no ANSI codes in logs (CI, nohup, a file)
if [ -t 1 ]; then step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }; else step() { printf '\n==> %s\n' "$*"; }; fi

step "Demo data: 4 sound classes x 24 clips of AST-shaped [1214, 768] embeddings (+ 12 held-out clips per class)"
feda2v-tk demo-data "$OUT/train.safetensors" --per-class 24
feda2v-tk demo-data "$OUT/heldout.safetensors" --per-class 12 --first-clip 96

step "A legacy config: validate finds the deprecated key (exit 1 is expected)"
feda2v-tk demo-data --legacy-config "$OUT/legacy.json"
feda2v-tk validate "$OUT/legacy.json" || echo "(validate exited $?)"

step "Migrate it: train at 16 tokens, generate at the full 1214"
feda2v-tk migrate "$OUT/legacy.json" --diff --training-length 16
feda2v-tk migrate "$OUT/legacy.json" --training-length 16 -o "$OUT/config.json" -q
feda2v-tk validate "$OUT/config.json"

step "Train what the legacy config asks for: the original code's label-conditioned VAE (length 16, learned upsampler)"
feda2v-tk train -c "$OUT/config.json" -d "$OUT/train.safetensors" -o "$OUT/vae.safetensors" \
  --seed 0 --checkpoint-dir "$OUT/checkpoints"

step "Train with the defaults: the closed-form gaussian generator and the lstsq upsampler (length 16)"
feda2v-tk train -d "$OUT/train.safetensors" -o "$OUT/model.safetensors" --training-length 16 \
  --output-length 1214 --seed 0 --checkpoint-dir "$OUT/checkpoints"

step "Inspect the model file"
feda2v-tk inspect "$OUT/model.safetensors"

step "Generate 8 full-length samples per class"
feda2v-tk generate "$OUT/model.safetensors" -o "$OUT/synthetic" --seed 0 --samples-per-class 8

step "Evaluate both against the held-out real clips: usefulness (TSTR) and privacy (distance to closest record)"
feda2v-tk evaluate "$OUT/vae.safetensors" --data "$OUT/heldout.safetensors" --train-data "$OUT/train.safetensors" --seed 0
feda2v-tk evaluate "$OUT/model.safetensors" --data "$OUT/heldout.safetensors" --train-data "$OUT/train.safetensors" --seed 0
echo "(TSTR next to real-only = how well the samples stand in for real clips; a DCR ratio near 1 = as far from"
echo " the training clips as new clips, below 0.8 = memorisation or collapse; every column: docs/evaluation.md)"

printf '\nDone: see %s/ (model.safetensors, synthetic/, model.metrics.jsonl).\n' "$OUT"
