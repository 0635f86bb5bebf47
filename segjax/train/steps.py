"""The pure train and eval steps. Parallel drivers (parallel.py) wrap these.

Data-parallel semantics: the loss is the mean over the labelled pixels of the
*global* batch. Each device sums its pixel losses and divides by the global pixel
count (a `psum` of the per-device counts); the gradient of the global mean is then
the `psum` of the per-device gradients. This equals the single-device gradient
exactly (up to float summation order) even when devices hold different numbers of
labelled pixels, which a `pmean` of per-device means would not.

DeepLab options (bound from the config by `bind_train_step` / `bind_eval_step`):
- `label_stride`: train the stride-s 'coarse_logits' against labels subsampled by s
  (DeepLab v1 §3.1, v2 §4.1) instead of the upsampled 'logits' (DeepLab v3 §4).
- multi-scale inputs: a model that returns 'scale_logits' ('scale_coarse_logits')
  gets one more loss term, weight 1, per input scale, as DeepLab v2's MSC training.
- `freeze_bn`: the gradients of BatchNorm scale/bias are zeroed (the model keeps the
  statistics fixed), so with the decay mask on them they never move.
- evaluation with test-time augmentation (input scales, horizontal flip: softmax
  probabilities averaged) and the dense CRF (`segjax.models.crf`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from segjax import models
from segjax.evaluation.segmentation_metrics import confusion_matrix
from segjax.models import crf, layers
from segjax.train import loss_scale
from segjax.train.losses import cross_entropy_sum
from segjax.train.state import TrainState


def subsample_labels(labels: jnp.ndarray, stride: int, size: Sequence[int]) -> jnp.ndarray:
  """[B, H, W] labels -> [B, h, w]: the label nearest each stride-s logit's centre.

  Logit (i, j) of a stride-s map sits at input pixel s*i + (s-1)/2 on the half-pixel
  grid that the x s bilinear upsampling uses (segjax.models.deeplab); the label taken
  is row min(s*i + s//2, H-1), column likewise. DeepLab v1 §3.1: "the targets are the
  ground truth labels (subsampled by 8)".
  """
  height, width = labels.shape[1], labels.shape[2]
  rows = np.minimum(np.arange(size[0]) * stride + stride // 2, height - 1)
  cols = np.minimum(np.arange(size[1]) * stride + stride // 2, width - 1)
  return labels[:, rows[:, None], cols[None, :]]


def zero_batch_norm_grads(grads, batch_stats):
  """Zeroes the gradients of every module that owns BatchNorm statistics (scale, bias)."""
  owners = {path[:-1] for path in flax.traverse_util.flatten_dict(batch_stats)}
  flat = flax.traverse_util.flatten_dict(grads)
  flat = {path: jnp.zeros_like(g) if path[:-1] in owners else g for path, g in flat.items()}
  return flax.traverse_util.unflatten_dict(flat)


def train_step(state: TrainState, batch: dict[str, jnp.ndarray], *,
               axis_name: str | None = None, ignore_label: int = 255,
               class_weights: Sequence[float] | None = None, aux_loss_weight: float = 0.4,
               label_stride: int | None = None, freeze_bn: bool = False,
               learning_rate_fn=None) -> tuple[TrainState, dict[str, Any]]:
  """One SGD step on `batch` = {'image': [B, H, W, 3] float, 'label': [B, H, W] int}.

  `axis_name` names the pmap axis (None under jit / one device). The returned
  metrics are global-batch values, identical on every device. `label_stride` and
  `freeze_bn`: see the module docstring. Each loss term is a mean over its own
  labelled pixels (subsampled ones for the coarse terms); 'loss' is
  main + per-scale terms + aux_loss_weight * aux.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    dropout_rng = jax.random.fold_in(dropout_rng, lax.axis_index(axis_name))

  def global_sum(x):
    return x if axis_name is None else lax.psum(x, axis_name)

  def mean_loss(logits, labels):
    loss_sum, count = cross_entropy_sum(logits, labels, ignore_label=ignore_label,
                                        class_weights=class_weights)
    return loss_sum / jnp.maximum(lax.stop_gradient(global_sum(count)), 1.0)

  def loss_fn(params):
    outputs, mutated = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    if label_stride:
      main_logits = outputs['coarse_logits']
      labels = subsample_labels(batch['label'], label_stride, main_logits.shape[1:3])
      scale_logits = outputs.get('scale_coarse_logits', ())
    else:
      main_logits, labels = outputs['logits'], batch['label']
      scale_logits = outputs.get('scale_logits', ())
    main_loss = mean_loss(main_logits, labels)
    total = main_loss + sum(mean_loss(logits, labels) for logits in scale_logits)
    if 'aux_logits' in outputs:
      total = total + aux_loss_weight * mean_loss(outputs['aux_logits'], batch['label'])
    aux = (mutated.get('batch_stats', {}), outputs['logits'], main_loss)
    return total, aux

  (loss, (batch_stats, logits, main_loss)), grads = loss_scale.value_and_grad(
      loss_fn, state.params, state.loss_scale)
  grads = global_sum(grads)
  if freeze_bn:
    grads = zero_batch_norm_grads(grads, state.batch_stats)
  global_loss = global_sum(loss)
  new_state, finite = state.apply_gradients_if_finite(grads, global_loss,
                                                      batch_stats=batch_stats)
  new_state, nonfinite, scale_metrics = loss_scale.after_step(
      new_state, state.loss_scale, finite, global_loss)

  labels = batch['label']
  labelled = labels != ignore_label
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) & labelled)
  metrics = {
      'loss': global_loss,
      'main_loss': global_sum(main_loss),
      'pixel_accuracy': global_sum(correct) / jnp.maximum(global_sum(jnp.sum(labelled)), 1),
      'grad_norm': optax.tree.norm(grads),
      # 1.0 where the update was skipped (non-finite loss or gradients), see
      # TrainState.apply_gradients_if_finite and config.nonfinite; with loss scaling,
      # an overflow skips the update but counts as 'overflow' (segjax.train.loss_scale).
      'nonfinite': nonfinite,
      **scale_metrics,
  }
  if learning_rate_fn is not None:
    metrics['learning_rate'] = learning_rate_fn(state.step)
  return new_state, metrics


def predict(state: TrainState, images: jnp.ndarray) -> jnp.ndarray:
  """[B, H, W, 3] normalised images -> [B, H, W, C] logits, inference mode."""
  outputs = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                           images, train=False)
  return outputs['logits']


def predict_probs(state: TrainState, images: jnp.ndarray, *,
                  scales: Sequence[float] = (1.0,), flip: bool = False) -> jnp.ndarray:
  """Test-time augmentation: [B, H, W, 3] -> [B, H, W, C] mean softmax probabilities.

  For each scale s the images are resized bilinearly to round(s*H) x round(s*W)
  (align_corners=False), the logits resized back to H x W, and softmax taken; with
  `flip` the horizontally mirrored images too (logits mirrored back). The mean is over
  all len(scales) * (1 + flip) passes (DeepLab v3 §4: multi-scale inputs and
  left-right flipped inputs, predictions averaged).
  """
  height, width = images.shape[1], images.shape[2]
  total = 0.0
  for s in scales:
    size = (max(1, round(height * s)), max(1, round(width * s)))
    scaled = layers.bilinear_resize(images, size, align_corners=False)
    views = [(scaled, False)] + ([(scaled[:, :, ::-1], True)] if flip else [])
    for view, mirrored in views:
      logits = predict(state, view)
      if mirrored:
        logits = logits[:, :, ::-1]
      logits = layers.bilinear_resize(logits, (height, width), align_corners=False)
      total = total + jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return total / (len(scales) * (1 + int(flip)))


# The colour given to padding pixels for the CRF: hundreds of theta_beta from any real
# 0..255 colour, so the appearance kernel never links padding and image.
_CRF_PAD_COLOUR = -1e3


def refine_with_crf(crf_config, logits: jnp.ndarray, images: jnp.ndarray,
                    valid: jnp.ndarray, mean: Sequence[float],
                    std: Sequence[float]) -> jnp.ndarray:
  """Dense-CRF probabilities [B, H, W, C] of normalised eval `images` and their `logits`.

  The images are un-normalised to 0..255 RGB (x * std + mean, the inverse of the
  pipeline's Normalize). Padding pixels (`valid` False) get uniform unaries and a
  colour far from every real one: they take no part through the appearance kernel,
  and through the 3-pixel smoothness kernel they only pass back what the image gave
  them. (digit_scenes images fill their canvas; only whole padding images are padded.)
  """
  rgb = images * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)
  rgb = jnp.where(valid[..., None], rgb, _CRF_PAD_COLOUR)
  logits = jnp.where(valid[..., None], logits, 0.0)
  return crf.apply_crf(crf_config, logits, rgb)


def predict_scores(state: TrainState, images: jnp.ndarray, valid: jnp.ndarray, *,
                   tta_scales: Sequence[float] = (1.0,), tta_flip: bool = False,
                   crf_config=None, mean: Sequence[float] = (0.0,) * 3,
                   std: Sequence[float] = (1.0,) * 3) -> jnp.ndarray:
  """[B, H, W, C] scores whose argmax is the prediction of normalised `images`.

  The logits without test-time augmentation or CRF; otherwise the TTA-averaged
  probabilities (`predict_probs`), refined by the CRF if `crf_config.enabled` (its
  unaries are the log-probabilities; `mean`/`std` are the dataset's normalisation;
  `valid` [B, H, W] marks real pixels, see `refine_with_crf`).
  """
  use_crf = crf_config is not None and crf_config.enabled
  if tuple(tta_scales) == (1.0,) and not tta_flip and not use_crf:
    return predict(state, images)
  scores = predict_probs(state, images, scales=tta_scales, flip=tta_flip)
  if use_crf:
    unary = jnp.log(jnp.maximum(scores, jnp.finfo(jnp.float32).tiny))
    scores = refine_with_crf(crf_config, unary, images, valid, mean, std)
  return scores


def eval_step(state: TrainState, batch: dict[str, jnp.ndarray], *, num_classes: int,
              axis_name: str | None = None, tta_scales: Sequence[float] = (1.0,),
              tta_flip: bool = False, crf_config=None, mean: Sequence[float] = (0.0,) * 3,
              std: Sequence[float] = (1.0,) * 3) -> jnp.ndarray:
  """[C, C] confusion matrix of one batch (with 'valid' masking padding), summed over devices.

  The prediction is the argmax of `predict_scores` (logits, or TTA-averaged and
  CRF-refined probabilities).
  """
  scores = predict_scores(state, batch['image'], batch['valid'], tta_scales=tta_scales,
                          tta_flip=tta_flip, crf_config=crf_config, mean=mean, std=std)
  predictions = jnp.argmax(scores, axis=-1)
  confusion = confusion_matrix(predictions, batch['label'], batch['valid'], num_classes)
  return confusion if axis_name is None else lax.psum(confusion, axis_name)


def bind_train_step(config, *, axis_name: str | None, learning_rate_fn=None):
  """The train step with the config's loss options fixed; only (state, batch) remain."""
  class_weights = config.loss.class_weights
  label_stride = (models.coarse_logits_stride(config.model)
                  if config.loss.downsample_labels else None)
  return functools.partial(
      train_step, axis_name=axis_name, ignore_label=config.dataset.ignore_label,
      class_weights=tuple(class_weights) if class_weights else None,
      aux_loss_weight=config.loss.aux_weight, label_stride=label_stride,
      freeze_bn=bool(config.model.get('freeze_bn', False)),
      learning_rate_fn=learning_rate_fn)


def bind_eval_step(config):
  """The eval step with the config's TTA/CRF options and dataset normalisation fixed.

  Returns a function (state, batch, *, axis_name=None) -> confusion matrix.
  """
  return functools.partial(
      eval_step, num_classes=config.dataset.num_classes,
      tta_scales=tuple(float(s) for s in config.eval.tta.scales),
      tta_flip=bool(config.eval.tta.flip), crf_config=config.eval.crf,
      mean=tuple(config.dataset.mean), std=tuple(config.dataset.std))


def bind_predict_scores(config):
  """`predict_scores` with the config's TTA/CRF options and normalisation fixed:
  (state, images, valid) -> [B, H, W, C] scores (what `bind_eval_step` takes the argmax of)."""
  return functools.partial(
      predict_scores, tta_scales=tuple(float(s) for s in config.eval.tta.scales),
      tta_flip=bool(config.eval.tta.flip), crf_config=config.eval.crf,
      mean=tuple(config.dataset.mean), std=tuple(config.dataset.std))
