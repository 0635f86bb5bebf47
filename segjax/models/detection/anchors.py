"""Anchor boxes for the RPN, one set per FPN level (Ren et al. 2015 §3.1; Lin et al. 2017 §4.1).

Anchors depend only on static shapes (image size, feature-map sizes), so they
are computed with NumPy at trace time and enter a jitted computation as
constants. Boxes are `(x1, y1, x2, y2)` pixels (see `boxes.py`).

The order is torchvision's `AnchorGenerator`, so RPN head outputs flattened the
same way line up with torchvision's anchors one for one:
level, then feature-map row (y), then column (x), then aspect ratio, then size.
An RPN head output `[B, h, w, A]` (NHWC) flattens with `reshape(B, h * w * A)`
to this order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Faster R-CNN with FPN: one size per level P2..P6, three aspect ratios (FPN §4.1).
DEFAULT_SIZES = ((32,), (64,), (128,), (256,), (512,))
DEFAULT_ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * 5


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
  """Zero-centred anchors of one level: [len(aspect_ratios) * len(sizes), 4] float32.

  An aspect ratio is height / width; the anchor keeps the area size**2. Ordered
  ratio-major, size-minor, and rounded to integers (half to even) like
  torchvision, whose arithmetic in float32 this repeats.
  """
  scales = np.asarray(sizes, np.float32)
  ratios = np.asarray(aspect_ratios, np.float32)
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1) / h_ratios
  ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
  return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)).astype(np.float32)


def grid_anchors(cell: np.ndarray, grid_size: tuple[int, int],
                 stride: tuple[int, int]) -> np.ndarray:
  """Shifts `cell` [A, 4] to every feature-map position: [h * w * A, 4] float32.

  The anchor of position (i, j) is centred on pixel `(j * stride_w, i * stride_h)`
  (torchvision's convention: the top-left corner of the cell, not its centre).
  """
  grid_h, grid_w = grid_size
  stride_h, stride_w = stride
  shift_y, shift_x = np.meshgrid(np.arange(grid_h) * stride_h, np.arange(grid_w) * stride_w,
                                 indexing='ij')
  shift_x = shift_x.reshape(-1)
  shift_y = shift_y.reshape(-1)
  shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=1).astype(np.float32)
  return (shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4)


@dataclasses.dataclass(frozen=True)
class AnchorGenerator:
  """Anchors for a list of feature maps, as torchvision's `AnchorGenerator`.

  Attributes:
    sizes: per level, the anchor sizes (sqrt of the area) in pixels.
    aspect_ratios: per level, the height / width ratios.

  Example (FPN, 5 levels, 3 anchors per position):

      gen = AnchorGenerator()
      anchors = gen((800, 800), [f.shape[1:3] for f in features])  # [A_total, 4]
  """
  sizes: tuple[tuple[float, ...], ...] = DEFAULT_SIZES
  aspect_ratios: tuple[tuple[float, ...], ...] = DEFAULT_ASPECT_RATIOS

  def __post_init__(self):
    if len(self.sizes) != len(self.aspect_ratios):
      raise ValueError(f'AnchorGenerator needs one aspect-ratio tuple per level: got '
                       f'{len(self.sizes)} size tuples {self.sizes!r} and '
                       f'{len(self.aspect_ratios)} aspect-ratio tuples {self.aspect_ratios!r}')
    for level_sizes, level_ratios in zip(self.sizes, self.aspect_ratios):
      if not level_sizes or any(not s > 0 for s in level_sizes):
        raise ValueError(f'anchor sizes {level_sizes!r} must be a non-empty tuple of '
                         'positive numbers')
      if not level_ratios or any(not r > 0 for r in level_ratios):
        raise ValueError(f'aspect ratios {level_ratios!r} must be a non-empty tuple of '
                         'positive numbers')

  def num_anchors_per_location(self) -> tuple[int, ...]:
    """A per level: the channels of the RPN head's objectness output."""
    return tuple(len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios))

  def num_anchors_per_level(self, feature_shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """`h * w * A` per level, to split the flat anchor axis back into levels."""
    self._check_levels(feature_shapes)
    return tuple(int(h) * int(w) * a for (h, w), a in
                 zip(feature_shapes, self.num_anchors_per_location()))

  def _check_levels(self, feature_shapes):
    if len(feature_shapes) != len(self.sizes):
      raise ValueError(f'got {len(feature_shapes)} feature maps {list(feature_shapes)!r} '
                       f'but the AnchorGenerator has {len(self.sizes)} levels')

  def __call__(self, image_shape: Sequence[int],
               feature_shapes: Sequence[Sequence[int]]) -> np.ndarray:
    """All anchors of one image: [sum of h * w * A over levels, 4] float32.

    Args:
      image_shape: `(H, W)` of the padded input batch. The stride of a level is
        `(H // h, W // w)`, torchvision's rule.
      feature_shapes: `(h, w)` per level, finest first.
    """
    self._check_levels(feature_shapes)
    image_h, image_w = (int(s) for s in image_shape)
    levels = []
    for (h, w), sizes, ratios in zip(feature_shapes, self.sizes, self.aspect_ratios):
      h, w = int(h), int(w)
      levels.append(grid_anchors(cell_anchors(sizes, ratios), (h, w),
                                 (image_h // h, image_w // w)))
    return np.concatenate(levels, axis=0)
