"""DeepLab v2 ASPP-L: four fc6-fc7-fc8 branches at rates (6, 12, 18, 24), summed (Chen et al., TPAMI 2017, §3.2, §4.1).

Train and evaluate on the embedded digit_scenes dataset (built on first use):
  python -m segjax.main --config=configs/deeplab_v2_aspp_l.py --workdir=/tmp/deeplab_v2_aspp_l
Paper settings on PASCAL VOC 2012 (build voc_segmentation/aug first: README.md, Datasets):
  python -m segjax.main --config=configs/deeplab_v2_aspp_l.py:voc --workdir=runs/deeplab_v2_aspp_l_voc
Evaluate with the dense CRF (reruns only the evaluation of a finished run):
  python -m segjax.main --config=configs/deeplab_v2_aspp_l.py --workdir=/tmp/deeplab_v2_aspp_l \\
      --config.eval.crf.enabled=True
Expected result on digit_scenes: val mIoU 0.526 (mean of 2 seeds, about 10 minutes on the 2-core CPU);
experiments/README.md, study deeplab_heads.
"""

from segjax import base_config

PRESETS = base_config.DEEPLAB_PRESETS


def get_config(preset=None):
  return base_config.deeplab_config('deeplab_v2_aspp_l', preset)
