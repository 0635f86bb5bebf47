"""DeepLab v1 MSc-LargeFOV: LargeFOV plus 128+128-channel branches on the input and pool1-4 (Chen et al., ICLR 2015, §4.3).

Train and evaluate on the embedded digit_scenes dataset (built on first use):
  python -m segjax.main --config=configs/deeplab_v1_msc_largefov.py --workdir=/tmp/deeplab_v1_msc_largefov
Paper settings on PASCAL VOC 2012 (build voc_segmentation/aug first: README.md, Datasets):
  python -m segjax.main --config=configs/deeplab_v1_msc_largefov.py:voc --workdir=runs/deeplab_v1_msc_largefov_voc
Evaluate with the dense CRF (reruns only the evaluation of a finished run):
  python -m segjax.main --config=configs/deeplab_v1_msc_largefov.py --workdir=/tmp/deeplab_v1_msc_largefov \\
      --config.eval.crf.enabled=True
Expected result on digit_scenes: not measured yet (experiments/README.md, study deeplab_heads,
measures LargeFOV, ASPP-S, ASPP-L and v3+).
"""

from segjax import base_config

PRESETS = base_config.DEEPLAB_PRESETS


def get_config(preset=None):
  return base_config.deeplab_config('deeplab_v1_msc_largefov', preset)
