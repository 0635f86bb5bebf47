"""DeepLab v1 LargeFOV: VGG-16 at output stride 8, fc6 3x3 x 1024 at rate 12 (Chen et al., ICLR 2015, §3.2, Table 2).

Train and evaluate on the embedded digit_scenes dataset (built on first use):
  python -m segjax.main --config=configs/deeplab_v1_largefov.py --workdir=/tmp/deeplab_v1_largefov
Paper settings on PASCAL VOC 2012 (build voc_segmentation/aug first: README.md, Datasets):
  python -m segjax.main --config=configs/deeplab_v1_largefov.py:voc --workdir=runs/deeplab_v1_largefov_voc
Evaluate with the dense CRF (reruns only the evaluation of a finished run):
  python -m segjax.main --config=configs/deeplab_v1_largefov.py --workdir=/tmp/deeplab_v1_largefov \\
      --config.eval.crf.enabled=True
Expected result on digit_scenes: val mIoU 0.083 (all background: the quarter-width VGG-16-BN from
scratch does not leave the all-background solution in 3,000 steps), 0.083 with the CRF;
experiments/README.md ("Choosing the DeepLab digit_scenes preset"). On a ResNet, see
configs/deeplab_v2_largefov.py.
"""

from segjax import base_config

PRESETS = base_config.DEEPLAB_PRESETS


def get_config(preset=None):
  return base_config.deeplab_config('deeplab_v1_largefov', preset)
