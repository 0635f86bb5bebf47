#!/usr/bin/env bash
# Trains the default digit_scenes preset of DeepLab-LargeFOV, v2 ASPP-S, v2 ASPP-L and v3+
# one after the other, then reruns each finished run with the dense CRF enabled (which
# only re-evaluates), and prints validation mIoU / pixel accuracy without and with the CRF
# and the wall time of each command.
#   bash experiments/deeplab_digit_scenes/run.sh [OUTDIR] [MODEL...]
set -euo pipefail
out=${1:-/tmp/deeplab_digit_scenes}
shift || true
models=${*:-deeplab_v1_largefov deeplab_v2_aspp_s deeplab_v2_aspp_l deeplab_v3plus}
mkdir -p "$out"
for model in $models; do
  rm -rf "$out/$model"
  start=$(date +%s)
  python -m segjax.main --config=configs/$model.py --workdir="$out/$model" 2> "$out/$model.log"
  mid=$(date +%s)
  python -m segjax.main --config=configs/$model.py --workdir="$out/$model" \
      --config.eval.crf.enabled=True 2> "$out/$model.crf.log"
  end=$(date +%s)
  python - "$out/$model" "$model" $((mid - start)) $((end - mid)) "$out/$model.crf.log" <<'PY'
import json, re, sys
from segjax.train.metric_writer import read_metrics
workdir, model, train_seconds, crf_seconds, crf_log = sys.argv[1:6]
final = read_metrics(workdir, 'eval')[-1]
train = read_metrics(workdir, 'train')
ips = sorted(r['images_per_second'] for r in train)[len(train) // 2]
crf = re.search(r'final eval: miou=([\d.]+) pixel_accuracy=([\d.]+)', open(crf_log).read())
print(json.dumps({
    'model': model, 'step': final['step'], 'miou': round(final['miou'], 4),
    'pixel_accuracy': round(final['pixel_accuracy'], 4),
    'crf_miou': round(float(crf.group(1)), 4), 'crf_pixel_accuracy': round(float(crf.group(2)), 4),
    'wall_seconds': int(train_seconds), 'crf_eval_wall_seconds': int(crf_seconds),
    'train_images_per_second_median': round(ips, 1)}))
PY
done | tee -a "$out/results.jsonl"
