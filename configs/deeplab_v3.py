"""DeepLab v3: ASPP with image pooling and BN (torchvision's DeepLabHead) (Chen et al., arXiv 2017, §3.3).

Train and evaluate on the embedded digit_scenes dataset (built on first use):
  python -m segjax.main --config=configs/deeplab_v3.py --workdir=/tmp/deeplab_v3
Paper settings on PASCAL VOC 2012 (build voc_segmentation/aug first: README.md, Datasets):
  python -m segjax.main --config=configs/deeplab_v3.py:voc --workdir=runs/deeplab_v3_voc
Evaluate with the dense CRF (reruns only the evaluation of a finished run):
  python -m segjax.main --config=configs/deeplab_v3.py --workdir=/tmp/deeplab_v3 \\
      --config.eval.crf.enabled=True
Expected result on digit_scenes: not measured yet (experiments/README.md, study deeplab_heads,
measures LargeFOV, ASPP-S, ASPP-L and v3+).
"""

from segjax import base_config

PRESETS = base_config.DEEPLAB_PRESETS


def get_config(preset=None):
  return base_config.deeplab_config('deeplab_v3', preset)
