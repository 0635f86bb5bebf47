"""DeepLab v2 LargeFOV: one fc6 (3x3, rate 12)-fc7-fc8 branch, the baseline of Chen et al., TPAMI 2017, Table 3.

The DeepLab v1 LargeFOV head (configs/deeplab_v1_largefov.py, VGG only) as a DeepLab v2
model, so it runs on the same backbones as ASPP-S / ASPP-L (ResNet here).

Train and evaluate on the embedded digit_scenes dataset (built on first use):
  python -m segjax.main --config=configs/deeplab_v2_largefov.py --workdir=/tmp/deeplab_v2_largefov
Paper settings on PASCAL VOC 2012 (build voc_segmentation/aug first: README.md, Datasets):
  python -m segjax.main --config=configs/deeplab_v2_largefov.py:voc --workdir=runs/deeplab_v2_largefov_voc
Evaluate with the dense CRF (reruns only the evaluation of a finished run):
  python -m segjax.main --config=configs/deeplab_v2_largefov.py --workdir=/tmp/deeplab_v2_largefov \\
      --config.eval.crf.enabled=True
Expected result on digit_scenes: val mIoU 0.500 (mean of 2 seeds, about 5 minutes on the 2-core CPU);
experiments/README.md, study deeplab_heads.
"""

from segjax import base_config

PRESETS = base_config.DEEPLAB_PRESETS


def get_config(preset=None):
  return base_config.deeplab_config('deeplab_v2_largefov', preset)
