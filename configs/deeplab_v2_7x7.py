"""DeepLab "7x7" head on any backbone: one fc6 (7x7 x 4096, rate 4)-fc7 (4096)-fc8 branch, Chen et al., ICLR 2015, Table 2.

DeepLab v1's "DeepLab-CRF-7x7" head (configs/deeplab_v1.py, VGG only) as a DeepLab v2
model, so it can be compared with LargeFOV (configs/deeplab_v2_largefov.py) on the same
ResNet: the head LargeFOV replaced at a fraction of the parameters.
On ResNet-101 (the voc preset) res5's 2,048 channels make fc6 alone 411M parameters
(7 x 7 x 2048 x 4096; on VGG-16's 512-channel pool5 it is 103M).

Train and evaluate on the embedded digit_scenes dataset (built on first use):
  python -m segjax.main --config=configs/deeplab_v2_7x7.py --workdir=/tmp/deeplab_v2_7x7
Paper settings on PASCAL VOC 2012 (the v2 recipe; build voc_segmentation/aug first: README.md, Datasets):
  python -m segjax.main --config=configs/deeplab_v2_7x7.py:voc --workdir=runs/deeplab_v2_7x7_voc
Expected result on digit_scenes: val mIoU 0.388 (mean of 2 seeds, about 20 minutes on the 2-core CPU;
LargeFOV on the same backbone 0.500); experiments/README.md, study deeplab_fc6.
"""

from segjax import base_config

PRESETS = base_config.DEEPLAB_PRESETS


def get_config(preset=None):
  return base_config.deeplab_config('deeplab_v2_7x7', preset)
