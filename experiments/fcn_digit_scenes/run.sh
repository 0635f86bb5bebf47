#!/usr/bin/env bash
# Trains the default digit_scenes preset of FCN-32s, FCN-16s and FCN-8s one after the
# other and prints each run's final validation metrics and wall time.
#   bash experiments/fcn_digit_scenes/run.sh [OUTDIR]
set -euo pipefail
out=${1:-/tmp/fcn_digit_scenes}
mkdir -p "$out"
for model in fcn8s fcn16s fcn32s; do
  rm -rf "$out/$model"
  start=$(date +%s)
  python -m segjax.main --config=configs/$model.py --workdir="$out/$model" 2> "$out/$model.log"
  end=$(date +%s)
  python - "$out/$model" "$model" $((end - start)) <<'PY'
import json, sys
from segjax.train.metric_writer import read_metrics
workdir, model, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
final_eval = read_metrics(workdir, 'eval')[-1]
train = read_metrics(workdir, 'train')
images_per_second = sorted(r['images_per_second'] for r in train)[len(train) // 2]
print(json.dumps({'model': model, 'step': final_eval['step'], 'miou': round(final_eval['miou'], 4),
                  'pixel_accuracy': round(final_eval['pixel_accuracy'], 4),
                  'wall_seconds': seconds, 'train_images_per_second_median': round(images_per_second, 1)}))
PY
done | tee "$out/results.jsonl"
