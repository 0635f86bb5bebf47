"""DeepLab v1 ("DeepLab-CRF-7x7"): VGG-16 at output stride 8, fc6 7x7 x 4096 at rate 4 (Chen et al., ICLR 2015, §3.1-3.2).

Train and evaluate on the embedded digit_scenes dataset (built on first use):
  python -m segjax.main --config=configs/deeplab_v1.py --workdir=/tmp/deeplab_v1
Paper settings on PASCAL VOC 2012 (build voc_segmentation/aug first: README.md, Datasets):
  python -m segjax.main --config=configs/deeplab_v1.py:voc --workdir=runs/deeplab_v1_voc
Evaluate with the dense CRF (reruns only the evaluation of a finished run):
  python -m segjax.main --config=configs/deeplab_v1.py --workdir=/tmp/deeplab_v1 \\
      --config.eval.crf.enabled=True
Expected result on digit_scenes: not measured yet (experiments/README.md, study deeplab_heads,
measures LargeFOV, ASPP-S, ASPP-L and v3+).
"""

from segjax import base_config

PRESETS = base_config.DEEPLAB_PRESETS


def get_config(preset=None):
  return base_config.deeplab_config('deeplab_v1', preset)
