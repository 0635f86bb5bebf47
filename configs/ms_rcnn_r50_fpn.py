"""Mask Scoring R-CNN (Huang et al., CVPR 2019): Mask R-CNN + MaskIoU head.

Train and evaluate (COCO box/mask AP on digit_scenes validation) on a 2-core CPU:
  python -m segjax.main --config=configs/ms_rcnn_r50_fpn.py --workdir=/tmp/ms_rcnn
The 1x schedule on COCO (ResNet-50-FPN, batch 16, lr 0.02, 90k iterations; needs a COCO
instance builder, which segjax does not have yet: validation says so):
  python -m segjax.main --config=configs/ms_rcnn_r50_fpn.py:coco --workdir=runs/ms_rcnn_coco
Expected digit_scenes results and run times: README.md, "Instance segmentation".
"""

from segjax import detection_config

PRESETS = detection_config.PRESETS


def get_config(preset=None):
  return detection_config.detection_config('ms_rcnn', preset)
