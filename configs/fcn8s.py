"""FCN-8s: FCN-16s fused again with a pool3 score layer (Long et al., CVPR 2015, §4.2).

Train and evaluate on the embedded digit_scenes dataset (built on first use):
  python -m segjax.main --config=configs/fcn8s.py --workdir=/tmp/fcn8s
Paper settings on PASCAL VOC 2012 (build voc_segmentation/aug first: README.md, Datasets):
  python -m segjax.main --config=configs/fcn8s.py:voc --workdir=runs/fcn8s_voc
Expected result on digit_scenes: see the table in README.md.
"""

from segjax import base_config

PRESETS = base_config.FCN_PRESETS


def get_config(preset=None):
  return base_config.fcn_config('fcn8s', preset)
