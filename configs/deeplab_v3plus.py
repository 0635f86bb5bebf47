"""DeepLab v3+: the v3 ASPP encoder with a stride-4 decoder (Chen et al., ECCV 2018, §3.1).

Train and evaluate on the embedded digit_scenes dataset (built on first use):
  python -m segjax.main --config=configs/deeplab_v3plus.py --workdir=/tmp/deeplab_v3plus
Paper settings on PASCAL VOC 2012 (build voc_segmentation/aug first: README.md, Datasets):
  python -m segjax.main --config=configs/deeplab_v3plus.py:voc --workdir=runs/deeplab_v3plus_voc
Evaluate with the dense CRF (reruns only the evaluation of a finished run):
  python -m segjax.main --config=configs/deeplab_v3plus.py --workdir=/tmp/deeplab_v3plus \\
      --config.eval.crf.enabled=True
Expected result on digit_scenes: val mIoU 0.710, 0.666 with the CRF (mean of 2 seeds; 5,000 steps,
8 minutes on the 2-core CPU); experiments/README.md, studies deeplab_heads and crf.
"""

from segjax import base_config

PRESETS = base_config.DEEPLAB_PRESETS


def get_config(preset=None):
  return base_config.deeplab_config('deeplab_v3plus', preset)
