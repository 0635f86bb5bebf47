#!/usr/bin/env bash
# Trains the digit_scenes preset of Faster R-CNN, Mask R-CNN and Mask Scoring R-CNN one
# after the other (CPU, ~10 minutes each on a loaded 2-core machine) and prints each
# run's final COCO metrics on digit_scenes validation (500 scenes) and wall time.
#   bash experiments/detection_digit_scenes/run.sh [OUTDIR] [MODEL...]
set -euo pipefail
out=${1:-/tmp/detection_digit_scenes}
shift || true
models=${*:-faster_rcnn mask_rcnn ms_rcnn}
mkdir -p "$out"
for model in $models; do
  rm -rf "$out/$model"
  start=$(date +%s)
  python -m segjax.main --config=configs/${model}_r50_fpn.py --workdir="$out/$model" \
      2> "$out/$model.log"
  end=$(date +%s)
  python - "$out/$model" "$model" $((end - start)) <<'PY'
import json, sys
from segjax.train.metric_writer import read_metrics
workdir, model, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
final = read_metrics(workdir, 'eval')[-1]
train = read_metrics(workdir, 'train')
ips = sorted(r['images_per_second'] for r in train)[len(train) // 2]
record = {'model': model, 'step': final['step'], 'wall_seconds': seconds,
          'train_images_per_second_median': round(ips, 1)}
record.update({k: round(v, 4) for k, v in final.items()
               if k.split('_')[0] in ('bbox', 'segm') and k[-2:] in ('AP', '50', '75')})
print(json.dumps(record))
PY
done | tee -a "$out/results.jsonl"
