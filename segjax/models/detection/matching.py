"""Training targets: box matching, balanced sampling, regression and mask targets.

The pieces of torchvision's `RegionProposalNetwork` and `RoIHeads` that turn
ground truth into per-anchor / per-proposal targets, with static shapes:

- Ground truth is padded to `max_instances` with a validity mask `gt_valid`;
  anchors / proposals may carry `valid` too. Padding never matches anything.
- `Matcher` returns, per prediction, a ground-truth index or
  `BELOW_LOW_THRESHOLD` (-1, background) / `BETWEEN_THRESHOLDS` (-2, ignored).
- `sample_balanced` draws a fixed number of slots with a validity mask instead
  of torchvision's variable-length index lists.

Boxes are `(x1, y1, x2, y2)` pixels (see `boxes.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from segjax.models.detection import roi_align as roi_align_lib
from segjax.models.detection.boxes import BoxCoder, box_iou

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


@dataclasses.dataclass(frozen=True)
class Matcher:
  """Assigns each prediction its best-overlapping ground truth, as torchvision's `Matcher`.

  A prediction whose best IoU is >= `high_threshold` matches that ground truth;
  below `low_threshold` it is `BELOW_LOW_THRESHOLD`; in between,
  `BETWEEN_THRESHOLDS`. With `allow_low_quality_matches` (the RPN, Faster R-CNN
  §3.1.2) every prediction that ties for the highest IoU with some ground truth
  keeps its best match even below the thresholds, so no ground truth is left
  without an anchor. As in torchvision, such a prediction takes its own best
  ground truth (argmax over ground truth, first on ties), which need not be the
  one it was highest for; and a ground truth that overlaps nothing (highest IoU
  0) restores every prediction with IoU 0 to it.

  Attributes:
    high_threshold: foreground IoU (0.7 RPN, 0.5 RoI heads).
    low_threshold: background IoU below this (0.3 RPN, 0.5 RoI heads).
    allow_low_quality_matches: see above (True in the RPN).
  """
  high_threshold: float
  low_threshold: float
  allow_low_quality_matches: bool = False

  def __post_init__(self):
    if not self.low_threshold <= self.high_threshold:
      raise ValueError(f'Matcher low_threshold={self.low_threshold!r} must be <= '
                       f'high_threshold={self.high_threshold!r}')

  def __call__(self, match_quality_matrix: jax.Array, gt_valid: jax.Array | None = None,
               pred_valid: jax.Array | None = None) -> jax.Array:
    """Matched ground-truth index per prediction.

    Args:
      match_quality_matrix: [M, N] IoU of M ground truths with N predictions.
      gt_valid: optional [M] bool; padded ground truth matches nothing.
      pred_valid: optional [N] bool; padded predictions get `BELOW_LOW_THRESHOLD`
        and take no part in the low-quality rule.

    Returns:
      [N] int32: index in [0, M), or -1 / -2.
    """
    quality = match_quality_matrix
    num_gt, num_pred = quality.shape
    valid_pair = jnp.ones(quality.shape, bool)
    if gt_valid is not None:
      valid_pair &= gt_valid[:, None]
    if pred_valid is not None:
      valid_pair &= pred_valid[None, :]
    if num_gt == 0:
      return jnp.full((num_pred,), BELOW_LOW_THRESHOLD, jnp.int32)
    # IoU is >= 0, so -1 ranks padding below every real pair.
    quality = jnp.where(valid_pair, quality, -1.0)
    matched_vals = jnp.max(quality, axis=0)
    all_matches = jnp.argmax(quality, axis=0).astype(jnp.int32)
    matches = jnp.where(matched_vals < self.low_threshold, BELOW_LOW_THRESHOLD,
                        jnp.where(matched_vals < self.high_threshold, BETWEEN_THRESHOLDS,
                                  all_matches))
    if self.allow_low_quality_matches:
      highest_per_gt = jnp.max(quality, axis=1)
      is_highest = valid_pair & (quality == highest_per_gt[:, None])
      matches = jnp.where(jnp.any(is_highest, axis=0), all_matches, matches)
    return matches.astype(jnp.int32)


class BalancedSample(NamedTuple):
  """`batch_size_per_image` sampled slots: positives first, then negatives, then padding.

  Attributes:
    indices: [S] int32 indices into the sampled axis; -1 in padding slots.
    positive: [S] bool, True for sampled positives.
    valid: [S] bool, True for sampled (positive or negative) slots.
  """
  indices: jax.Array
  positive: jax.Array
  valid: jax.Array

  def masks(self, num: int) -> tuple[jax.Array, jax.Array]:
    """(positive, negative) [num] bool masks over the sampled axis."""
    safe = jnp.where(self.valid, self.indices, num)  # out of range -> dropped
    pos = jnp.zeros((num,), bool).at[safe].set(self.positive, mode='drop')
    neg = jnp.zeros((num,), bool).at[safe].set(~self.positive, mode='drop')
    return pos, neg


def _check_sampler_args(batch_size_per_image, positive_fraction):
  if (isinstance(batch_size_per_image, bool)
      or not isinstance(batch_size_per_image, numbers.Integral) or batch_size_per_image < 1):
    raise ValueError(f'batch_size_per_image={batch_size_per_image!r} must be an integer >= 1')
  if not isinstance(positive_fraction, numbers.Real) or not 0 <= positive_fraction <= 1:
    raise ValueError(f'positive_fraction={positive_fraction!r} must be a number in [0, 1]')


def _random_subset(key, candidates, k):
  """k slots drawn uniformly without replacement from `candidates` [N] bool."""
  if k == 0:
    return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool)
  priority = jnp.where(candidates, jax.random.uniform(key, candidates.shape), -1.0)
  values, indices = jax.lax.top_k(priority, k)
  return indices.astype(jnp.int32), values >= 0


@functools.partial(jax.jit, static_argnames=('batch_size_per_image', 'positive_fraction'))
def sample_balanced(key: jax.Array, labels: jax.Array, batch_size_per_image: int,
                    positive_fraction: float) -> BalancedSample:
  """Random positives and negatives, torchvision's `BalancedPositiveNegativeSampler`.

  Takes `min(int(S * positive_fraction), #positives)` positives and fills the
  rest of the S = `batch_size_per_image` slots with negatives, as many as exist;
  each subset is uniform without replacement. Slots left over are padding.

  Args:
    key: PRNG key.
    labels: [N] int; >= 1 positive, 0 negative, < 0 (e.g. -1) ignored.
    batch_size_per_image: S (256 RPN, 512 RoI heads).
    positive_fraction: 0.5 RPN, 0.25 RoI heads.
  """
  _check_sampler_args(batch_size_per_image, positive_fraction)
  num = labels.shape[0]
  max_pos = int(batch_size_per_image * positive_fraction)
  pos_key, neg_key = jax.random.split(key)
  pos_idx, pos_ok = _random_subset(pos_key, labels >= 1, min(max_pos, num))
  num_pos = jnp.sum(pos_ok, dtype=jnp.int32)
  neg_idx, neg_ok = _random_subset(neg_key, labels == 0, min(batch_size_per_image, num))
  neg_ok &= jnp.arange(neg_idx.shape[0]) < batch_size_per_image - num_pos
  indices = jnp.concatenate([pos_idx, neg_idx])
  positive = jnp.concatenate([pos_ok, jnp.zeros_like(neg_ok)])
  valid = jnp.concatenate([pos_ok, neg_ok])
  pad = max(0, batch_size_per_image - indices.shape[0])
  indices = jnp.pad(indices, (0, pad), constant_values=-1)
  positive = jnp.pad(positive, (0, pad))
  valid = jnp.pad(valid, (0, pad))
  # Valid slots first (positives stay ahead of negatives); at most S of them.
  order = jnp.argsort(~valid, stable=True)[:batch_size_per_image]
  valid = valid[order]
  return BalancedSample(jnp.where(valid, indices[order], -1), positive[order], valid)


class AnchorTargets(NamedTuple):
  """RPN targets per anchor.

  Attributes:
    labels: [A] float32: 1 foreground, 0 background, -1 ignored (torchvision's).
    matched_gt_boxes: [A, 4] the matched ground-truth box (ground truth 0 for
      unmatched anchors, whose regression is never used).
    matched_idxs: [A] int32 Matcher output.
  """
  labels: jax.Array
  matched_gt_boxes: jax.Array
  matched_idxs: jax.Array


def assign_anchor_targets(anchors: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array,
                          matcher: Matcher) -> AnchorTargets:
  """torchvision's `RegionProposalNetwork.assign_targets_to_anchors`, one image.

  Args:
    anchors: [A, 4].
    gt_boxes: [M, 4] padded ground truth.
    gt_valid: [M] bool. An image without valid ground truth gets all anchors
      as background, as torchvision's empty-target branch.
    matcher: `Matcher(0.7, 0.3, allow_low_quality_matches=True)` in torchvision.
  """
  matched_idxs = matcher(box_iou(gt_boxes, anchors), gt_valid)
  labels = jnp.where(matched_idxs >= 0, 1.0,
                     jnp.where(matched_idxs == BETWEEN_THRESHOLDS, -1.0, 0.0))
  matched = gt_boxes[jnp.maximum(matched_idxs, 0)]
  return AnchorTargets(labels.astype(jnp.float32), matched, matched_idxs)


class ProposalTargets(NamedTuple):
  """RoI-head targets per proposal.

  Attributes:
    labels: [R] int32 class of the matched ground truth, 0 background, -1 ignored.
    matched_gt_boxes: [R, 4] (ground truth 0 where unmatched).
    matched_idxs: [R] int32 index of the matched ground truth, clamped to >= 0
      as torchvision's `matched_idxs` (use `labels` to tell background).
  """
  labels: jax.Array
  matched_gt_boxes: jax.Array
  matched_idxs: jax.Array


def assign_proposal_targets(proposals: jax.Array, gt_boxes: jax.Array, gt_labels: jax.Array,
                            gt_valid: jax.Array, matcher: Matcher, *,
                            proposals_valid: jax.Array | None = None) -> ProposalTargets:
  """torchvision's `RoIHeads.assign_targets_to_proposals`, one image.

  Args:
    proposals: [R, 4] (torchvision appends the ground-truth boxes to the
      proposals first, `add_gt_proposals`; do the same with padding).
    gt_boxes: [M, 4]; gt_labels: [M] int classes >= 1; gt_valid: [M] bool.
    matcher: `Matcher(0.5, 0.5, allow_low_quality_matches=False)` in torchvision.
    proposals_valid: optional [R] bool; invalid proposals get label -1 (ignored).
  """
  matched_idxs = matcher(box_iou(gt_boxes, proposals), gt_valid)
  clamped = jnp.maximum(matched_idxs, 0)
  labels = gt_labels.astype(jnp.int32)[clamped]
  labels = jnp.where(matched_idxs == BELOW_LOW_THRESHOLD, 0, labels)
  labels = jnp.where(matched_idxs == BETWEEN_THRESHOLDS, -1, labels)
  if proposals_valid is not None:
    labels = jnp.where(proposals_valid, labels, -1)
  return ProposalTargets(labels, gt_boxes[clamped], clamped)


def encode_regression_targets(box_coder: BoxCoder, matched_gt_boxes: jax.Array,
                              reference_boxes: jax.Array, valid: jax.Array) -> jax.Array:
  """`box_coder.encode` where `valid`, 0 elsewhere (no NaN from padded boxes).

  Args:
    box_coder: `BoxCoder((1, 1, 1, 1))` RPN, `BoxCoder((10, 10, 5, 5))` RoI heads.
    matched_gt_boxes, reference_boxes: [..., 4].
    valid: [...] bool, e.g. the positive mask; only these enter a regression loss.
  """
  unit = jnp.asarray([0.0, 0.0, 1.0, 1.0], reference_boxes.dtype)
  ref = jnp.where(valid[..., None], reference_boxes, unit)
  gt = jnp.where(valid[..., None], matched_gt_boxes, unit)
  return jnp.where(valid[..., None], box_coder.encode(gt, ref), 0.0)


@functools.partial(jax.jit, static_argnames=('mask_size', 'impl', 'max_sampling_ratio'))
def project_masks_on_boxes(gt_masks: jax.Array, boxes: jax.Array, matched_idxs: jax.Array,
                           mask_size: int, *, impl: str = 'auto',
                           max_sampling_ratio: int | Sequence[int] | None = None) -> jax.Array:
  """Mask R-CNN mask targets: each box's matched ground-truth mask, RoIAligned.

  torchvision's `project_masks_on_boxes`: RoIAlign of the binary mask with
  `spatial_scale=1`, adaptive sampling, `aligned=False`, output
  `mask_size x mask_size` (28). The adaptive bound defaults to the exact one for
  boxes inside the image (see `roi_align`).

  Args:
    gt_masks: [M, H, W] ground-truth masks of one image (any real dtype).
    boxes: [K, 4] positive proposals.
    matched_idxs: [K] their ground-truth indices.
    mask_size: M_out.
    impl, max_sampling_ratio: as `roi_align_indexed`.

  Returns:
    [K, mask_size, mask_size] float32 soft targets in [0, 1].
  """
  if gt_masks.ndim != 3:
    raise ValueError(f'gt_masks must have shape [M, H, W], got {gt_masks.shape}')
  masks = gt_masks.astype(jnp.float32)[..., None]
  out = roi_align_lib.roi_align_indexed(masks, boxes, matched_idxs, mask_size,
                                        spatial_scale=1.0, sampling_ratio=-1, aligned=False,
                                        impl=impl, max_sampling_ratio=max_sampling_ratio)
  return out[..., 0]
