#!/usr/bin/env bash
# Runs the ablation studies of experiments/README.md one after the other (CPU: about
# 2.5 hours for the default list on the 2-core machine, one seed), each writing
# experiments/STUDY/{results.json,table.md,curves.png,final.png}.
#   bash experiments/run_studies.sh [OUTDIR] [STUDY...]
# Identical runs are shared between studies (FCN-8s's preset run serves fcn_skips,
# fcn_upsampling and crf; v3+'s serves deeplab_heads and crf), so keep OUTDIR between calls.
set -euo pipefail
out=${1:-/tmp/segjax_studies}
shift || true
studies=${*:-fcn_skips fcn_upsampling deeplab_fc6 deeplab_heads crf roi_pooler mask_scoring}
for study in $studies; do
  python experiments/studies.py "$study" --outdir="$out"
done
