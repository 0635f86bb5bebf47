#!/usr/bin/env bash
# FCN-32s / 16s / 8s with their default digit_scenes presets: the fcn_skips study of
# experiments/studies.py (results in experiments/fcn_skips/).
#   bash experiments/fcn_digit_scenes/run.sh [OUTDIR]
set -euo pipefail
python experiments/studies.py fcn_skips --outdir="${1:-/tmp/segjax_studies}"
