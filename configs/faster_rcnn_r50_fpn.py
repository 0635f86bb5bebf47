"""Faster R-CNN (Ren et al., NeurIPS 2015) with FPN (Lin et al., CVPR 2017).

Train and evaluate (COCO box/mask AP on digit_scenes validation) on a 2-core CPU:
  python -m segjax.main --config=configs/faster_rcnn_r50_fpn.py --workdir=/tmp/faster_rcnn
The 1x schedule on COCO (ResNet-50-FPN, batch 16, lr 0.02, 90k iterations; needs a COCO
instance builder, which segjax does not have yet: validation says so):
  python -m segjax.main --config=configs/faster_rcnn_r50_fpn.py:coco --workdir=runs/faster_rcnn_coco
Expected digit_scenes results and run times: README.md, "Instance segmentation".
"""

from segjax import detection_config

PRESETS = detection_config.PRESETS


def get_config(preset=None):
  return detection_config.detection_config('faster_rcnn', preset)
