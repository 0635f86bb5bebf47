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

Each function is numerically compared with torchvision in
`tests/test_detection_*.py`.
"""
