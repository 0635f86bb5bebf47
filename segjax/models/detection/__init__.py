"""Detection ops for Faster / Mask R-CNN: pure, jit-compiled, static-shape JAX functions.

Boxes are `(x1, y1, x2, y2)` in image pixels everywhere (torchvision's
convention, see `boxes.py`); feature maps are NHWC. Modules:

  boxes.py                  IoU, area, clipping, small-box mask, `BoxCoder`
  anchors.py                `AnchorGenerator` (torchvision's anchor order)
  nms.py                    `nms`, `batched_nms` with a fixed number of outputs
  roi_align.py              `roi_align`, `roi_align_indexed` ('gather' | 'matmul')
  multiscale_roi_align.py   FPN level assignment + `multiscale_roi_align`
  roi_pool.py               `roi_pool` (Fast R-CNN)
  matching.py               `Matcher`, balanced sampler, anchor / proposal / mask targets
  fpn.py rpn.py roi_heads.py mask_rcnn.py   the Faster / Mask / MS R-CNN modules

Each function is numerically compared with torchvision in
`tests/test_detection_*.py`.

Public API (`__all__`): the modules above, and their main names at package level:

    from segjax.models import detection
    iou = detection.box_iou(a, b)                                   # [N, M]
    kept = detection.nms.nms(boxes, scores, 0.5, max_output_size=100)  # NmsOutput
    kept = detection.batched_nms(boxes, scores, classes, 0.5, max_output_size=100)
    feats = detection.roi_align.roi_align(fmap, rois, 7, spatial_scale=0.25)
    model = detection.build_detector(detection.default_detection_model_config(), num_classes=11)

`nms`, `roi_align`, `roi_pool` and `multiscale_roi_align` name both a module and its
main function; at package level the name is the module (call `nms.nms(...)`), so that
`from segjax.models.detection import nms` keeps meaning the module.
"""

from segjax.models.detection import (anchors, boxes, fpn, mask_rcnn, matching,
                                     multiscale_roi_align, nms, roi_align, roi_heads,
                                     roi_pool, rpn)
from segjax.models.detection.anchors import AnchorGenerator
from segjax.models.detection.boxes import (BoxCoder, box_area, box_iou, clip_boxes_to_image,
                                           remove_small_boxes)
from segjax.models.detection.mask_rcnn import (DETECTION_MODELS, FasterRCNN, MaskRCNN,
                                               MaskScoringRCNN, build_detector,
                                               default_detection_model_config,
                                               paste_masks_in_image)
from segjax.models.detection.matching import Matcher, sample_balanced
from segjax.models.detection.multiscale_roi_align import map_levels
from segjax.models.detection.nms import NmsOutput, batched_nms
from segjax.models.detection.roi_align import roi_align_indexed

__all__ = [
    # modules
    'anchors', 'boxes', 'fpn', 'mask_rcnn', 'matching', 'multiscale_roi_align', 'nms',
    'roi_align', 'roi_heads', 'roi_pool', 'rpn',
    # boxes and anchors
    'AnchorGenerator', 'BoxCoder', 'box_area', 'box_iou', 'clip_boxes_to_image',
    'remove_small_boxes',
    # NMS, RoI ops, matching
    'NmsOutput', 'batched_nms', 'roi_align_indexed', 'map_levels', 'Matcher',
    'sample_balanced',
    # models
    'DETECTION_MODELS', 'FasterRCNN', 'MaskRCNN', 'MaskScoringRCNN', 'build_detector',
    'default_detection_model_config', 'paste_masks_in_image',
]
