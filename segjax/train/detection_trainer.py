"""Training loop of the detectors: train step, parallel drivers, COCO evaluation, resume.

The same shape as `segjax.train.trainer` (which serves the semantic models): one pure
train step `(state, batch) -> (state, metrics)` wrapped by the pmap or jit driver of
`segjax.train.parallel`, Orbax checkpoints of state + input-iterator position
(`checkpoints.Checkpointer`), WORKDIR/metrics.jsonl (`metric_writer`), and a periodic
COCO evaluation of the validation split through pycocotools (`evaluation.coco_eval`).

Data-parallel semantics: every loss term is (sum over this device's images) / (global
count), so the psum of per-device gradients is the global-batch gradient, and pmap and
jit give the same numbers. Each image's anchor / RoI sampling key is
fold_in(step key, global image index), the same whichever driver or device count runs.

With several JAX processes each one predicts its own slice of the eval split; the
COCO-format detections are then gathered from every process (`_gather_results`) and
each process scores the whole list with pycocotools, so all report the same AP.
"""

from __future__ import annotations

import functools
import os
import pickle
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.experimental import multihost_utils

from pycocotools import mask as mask_utils

from segjax import detection_config, visualize
from segjax.data import instance_pipeline, sources
from segjax.evaluation import coco_eval
from segjax.models.detection import mask_rcnn
from segjax.train import init_from, loop, loss_scale, optimizers, parallel, trainer
from segjax.train.state import TrainState, call_jitted_once

# Outputs fetched from the device at evaluation (proposals stay there).
_EVAL_OUTPUTS = ('boxes', 'scores', 'labels', 'valid', 'mask_probs', 'mask_scores')


def is_instance_config(config) -> bool:
  """True for a detection config (`config.task == 'instance'`); segjax.main dispatches on it."""
  return config.get('task', 'semantic') == detection_config.TASK


def build_model(config):
  return mask_rcnn.build_detector(config.model, num_classes=config.dataset.num_classes,
                                  bn_axis_name=parallel.bn_axis_name(config.parallel))


def learning_rate_schedule(opt_config, num_train_steps: int) -> optax.Schedule:
  """optimizers.learning_rate_schedule plus 'step': warmup, then x decay_factor at decay_steps."""
  if opt_config.schedule != 'step':
    return optimizers.learning_rate_schedule(opt_config, num_train_steps)
  base = opt_config.learning_rate
  boundaries = {int(s): float(opt_config.decay_factor) for s in opt_config.decay_steps}
  main = optax.piecewise_constant_schedule(base, boundaries)
  warmup = min(int(opt_config.warmup_steps), num_train_steps)
  if warmup == 0:
    return main
  # Detectron's linear warmup: factor w -> 1 over the first steps, applied to the main lr.
  ramp = optax.linear_schedule(opt_config.warmup_init_factor, 1.0, warmup)
  return lambda step: main(step) * jnp.where(step < warmup, ramp(step), 1.0)


def build_optimizer(opt_config, num_train_steps: int) -> optax.GradientTransformation:
  """optimizers.build_optimizer with `learning_rate_schedule` above."""
  detection_config.validate_detection_optimizer(opt_config)
  schedule = learning_rate_schedule(opt_config, num_train_steps)
  if opt_config.name == 'sgd':
    tx = optax.chain(
        optax.add_decayed_weights(opt_config.weight_decay, mask=optimizers.decay_mask),
        optax.sgd(schedule, momentum=opt_config.momentum or None, nesterov=opt_config.nesterov))
  else:
    tx = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2,
                     weight_decay=opt_config.weight_decay, mask=optimizers.decay_mask)
  if opt_config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), tx)
  return tx


def create_state(config) -> TrainState:
  """The initial TrainState (host arrays); init is jitted (eager init of the NMS loops is slow)."""
  model = build_model(config)
  tx = build_optimizer(config.optimizer, config.num_train_steps)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  height, width = config.dataset.pad_size
  variables = jax.device_get(call_jitted_once(
      functools.partial(model.init, train=False), {'params': init_rng},
      jnp.zeros((1, height, width, 3))))
  params = variables['params']
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                     rng=state_rng, apply_fn=model.apply, tx=tx,
                     loss_scale=loss_scale.initial(config))
  # Pretrained weights (segjax.convert); a resume then replaces every array (loop.run).
  return init_from.apply_to_state(state, config.init_from) if 'init_from' in config else state


def zero_batch_norm_grads(grads, batch_stats):
  """Zeroes the gradients of every module owning BatchNorm statistics (frozen BN)."""
  owners = {path[:-1] for path in flax.traverse_util.flatten_dict(batch_stats)}
  flat = flax.traverse_util.flatten_dict(grads)
  return flax.traverse_util.unflatten_dict(
      {p: jnp.zeros_like(g) if p[:-1] in owners else g for p, g in flat.items()})


def sampling_keys(rng: jax.Array, batch_size: int, axis_name: str | None) -> jax.Array:
  """[B] per-image keys fold_in(rng, global image index)."""
  offset = 0 if axis_name is None else lax.axis_index(axis_name) * batch_size
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(offset + jnp.arange(batch_size))


def targets_from_batch(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {'boxes': batch['gt_boxes'], 'labels': batch['gt_labels'], 'valid': batch['gt_valid'],
          'masks': batch['gt_masks']}


def train_step(state: TrainState, batch: dict[str, jax.Array], *, axis_name: str | None = None,
               freeze_bn: bool = False, learning_rate_fn=None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a batch of `instance_pipeline` (global-batch losses)."""
  step_rng = jax.random.fold_in(state.rng, state.step)
  keys = sampling_keys(step_rng, batch['image'].shape[0], axis_name)

  def global_sum(x):
    return x if axis_name is None else lax.psum(x, axis_name)

  def loss_fn(params):
    outputs, mutated = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        image_sizes=batch['image_size'], targets=targets_from_batch(batch),
        sampling_keys=keys, mutable=['batch_stats'])
    losses = mask_rcnn.finalize_losses(outputs['loss_terms'], axis_name)
    return losses['loss'], (losses, mutated.get('batch_stats', {}))

  (loss, (losses, batch_stats)), grads = loss_scale.value_and_grad(loss_fn, state.params,
                                                                  state.loss_scale)
  grads = global_sum(grads)
  if freeze_bn:
    grads = zero_batch_norm_grads(grads, state.batch_stats)
    batch_stats = state.batch_stats
  global_loss = global_sum(loss)
  new_state, finite = state.apply_gradients_if_finite(grads, global_loss,
                                                      batch_stats=batch_stats)
  new_state, nonfinite, scale_metrics = loss_scale.after_step(
      new_state, state.loss_scale, finite, global_loss)
  metrics = {name: global_sum(value) for name, value in losses.items()}
  metrics['grad_norm'] = optax.tree.norm(grads)
  metrics['nonfinite'] = nonfinite
  metrics.update(scale_metrics)
  metrics['num_gt'] = global_sum(jnp.sum(batch['gt_valid'], dtype=jnp.float32))
  if learning_rate_fn is not None:
    metrics['learning_rate'] = learning_rate_fn(state.step)
  return new_state, metrics


def bind_train_step(config, learning_rate_fn=None):
  return functools.partial(train_step, freeze_bn=bool(config.model.freeze_bn),
                           learning_rate_fn=learning_rate_fn)


def predict(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Inference outputs of a batch (padded detections, 28x28 mask probabilities)."""
  out = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                       batch['image'], train=False, image_sizes=batch['image_size'])
  return {k: v for k, v in out.items() if k in _EVAL_OUTPUTS}


class Predictor:
  """`predict` under the same parallelism as the driver's train step; host outputs [b, ...]."""

  def __init__(self, driver):
    self.driver = driver
    self.pmap = isinstance(driver, parallel.PmapDriver)
    if self.pmap:
      self._fn = jax.pmap(predict, axis_name=parallel.PMAP_AXIS)
    else:
      self._fn = jax.jit(predict, in_shardings=(driver.replicated, driver.data_sharding),
                         out_shardings=driver.data_sharding)

  def __call__(self, device_state, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    device_batch = self.driver.put_batch({'image': batch['image'],
                                          'image_size': batch['image_size']})
    out = self._fn(device_state, device_batch)
    if not self.pmap and jax.process_count() > 1:
      # This process's rows of the global outputs: the images of its own batch.
      out = multihost_utils.global_array_to_host_local_array(
          out, self.driver.mesh, self.driver.data_sharding.spec)
    out = jax.device_get(out)
    if self.pmap:
      out = {k: v.reshape((-1,) + v.shape[2:]) for k, v in out.items()}
    return out


def segm_score_key(config) -> str:
  """MS R-CNN ranks masks by cls score x MaskIoU (§3.3); the others by the cls score."""
  return 'mask_scores' if config.model.name == 'ms_rcnn' else 'scores'


def evaluate(predictor: Predictor, device_state, eval_loader, ground_truth, *,
             iou_types, segm_score_key: str = 'scores') -> dict[str, float]:
  """COCO metrics of the whole eval split. With MaskIoU scores, also 'segm_cls_score_*'
  (the same masks ranked by the class score) to show what rescoring changes."""
  results = []
  for batch in eval_loader:
    outputs = predictor(device_state, batch)
    results += coco_eval.detections_to_coco(outputs, batch, segm_score_key=segm_score_key)
  results = _gather_results(results)
  metrics = coco_eval.evaluate(ground_truth, results, iou_types)
  if segm_score_key != 'scores' and 'segm' in iou_types:
    plain = [dict(r, segm_score=r['score']) for r in results]
    metrics.update({k.replace('segm_', 'segm_cls_score_'): v for k, v in
                    coco_eval.evaluate(ground_truth, plain, ('segm',)).items()})
  return metrics


def _gather_results(results: list[dict]) -> list[dict]:
  """Every process's COCO results, process 0's first; `results` itself with one process."""
  if jax.process_count() == 1:
    return results
  encoded = np.frombuffer(pickle.dumps(results), np.uint8)
  sizes = multihost_utils.process_allgather(np.int64(encoded.size))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:encoded.size] = encoded
  gathered = multihost_utils.process_allgather(padded)
  return [result for size, row in zip(np.ravel(sizes), gathered)
          for result in pickle.loads(row[:int(size)].tobytes())]


def iou_types(config) -> tuple[str, ...]:
  return ('bbox',) if config.model.name == 'faster_rcnn' else ('bbox', 'segm')


def build_ground_truth(config):
  c = config.dataset
  return coco_eval.ground_truth_for_split(c.name, c.eval_split, c.data_dir, c.num_classes)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains a detector in `workdir` (resuming from its checkpoints); returns final COCO metrics."""
  detection_config.validate_detection_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  state = create_state(config)
  lr_fn = learning_rate_schedule(config.optimizer, config.num_train_steps)
  driver = parallel.make_driver(config.parallel, bind_train_step(config, lr_fn),
                                config.dataset.num_classes)
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % driver.num_devices:
      raise ValueError(f'config.{name}={config[name]} is not divisible by the '
                       f'{driver.num_devices} devices')
  predictor = Predictor(driver)
  train_iter = iter(instance_pipeline.create_train_loader(
      config.dataset, global_batch_size=config.batch_size, seed=config.seed))
  eval_loader = instance_pipeline.create_eval_loader(config.dataset,
                                                     global_batch_size=config.eval_batch_size)
  ground_truth = build_ground_truth(config)
  types = iou_types(config)

  return loop.run(
      config, workdir, state=state, driver=driver, train_iter=train_iter,
      evaluate=make_evaluate(config, predictor, eval_loader, ground_truth),
      summarize=format_metrics, best_metric=f'{types[-1]}_AP')


# Detections drawn on the TensorBoard example images (all of them go to the COCO metric).
EXAMPLE_SCORE_THRESHOLD = 0.5


def example_panels(outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray],
                   num_images: int, mean, std, class_names=None,
                   score_threshold: float = EXAMPLE_SCORE_THRESHOLD) -> np.ndarray:
  """Rows of image | ground truth | detections (score >= `score_threshold`) for the first
  `num_images` real images of an eval `batch` and the model's `outputs` on it, drawn
  at the resized input's resolution."""
  rows = []
  for i in np.flatnonzero(np.asarray(batch['image_id']) >= 0)[:num_images]:
    h, w = (int(v) for v in batch['image_size'][i])
    image = trainer.unnormalize(batch['image'][i, :h, :w], mean, std)
    valid = np.asarray(batch['gt_valid'][i], bool)
    ground_truth = {'boxes': batch['gt_boxes'][i][valid], 'labels': batch['gt_labels'][i][valid],
                    'masks': batch['gt_masks'][i][valid][:, :h, :w]}
    # detections_to_coco with scale 1 and orig_size = the resized size: the results
    # are in this image's pixels.
    one = {'image_id': batch['image_id'][i:i + 1], 'scale': np.ones((1, 2), np.float32),
           'orig_size': np.asarray([[h, w]], np.int32)}
    results = [r for r in coco_eval.detections_to_coco({k: v[i:i + 1] for k, v in outputs.items()},
                                                       one)
               if r['score'] >= score_threshold]
    rows.append(visualize.instance_panel(image, ground_truth, instances_from_coco(results, (h, w)),
                                         class_names))
  return visualize.panel_grid(rows, ('image', 'ground truth', 'detections'))


def instances_from_coco(results: list[dict], image_size: tuple[int, int]) -> dict[str, np.ndarray]:
  """COCO result dicts of one image -> 'boxes' [N, 4] (x1, y1, x2, y2), 'labels', 'scores'
  and, when they carry RLE segmentations, 'masks' [N, H, W] uint8."""
  boxes = np.asarray([[x, y, x + bw, y + bh] for x, y, bw, bh in (r['bbox'] for r in results)],
                     np.float32).reshape(-1, 4)
  instances = {'boxes': boxes, 'labels': np.asarray([r['category_id'] for r in results], np.int64),
               'scores': np.asarray([r['score'] for r in results], np.float32)}
  if results and 'segmentation' in results[0]:
    rles = [dict(r['segmentation'], counts=r['segmentation']['counts'].encode('ascii'))
            for r in results]
    instances['masks'] = np.moveaxis(mask_utils.decode(rles), -1, 0)
  elif not results:
    instances['masks'] = np.zeros((0,) + tuple(image_size), np.uint8)
  return instances


def make_evaluate(config, predictor: Predictor, eval_loader, ground_truth):
  """device_state -> COCO metrics and, with `config.eval.num_images` > 0 (one JAX
  process), the TensorBoard image 'eval/examples': that many validation images with
  ground truth and detections side by side."""
  types, score_key = iou_types(config), segm_score_key(config)
  num_images = int(config.get('eval', {}).get('num_images', 0))
  class_names = sources.class_names(config.dataset.name)
  first_batch = {}

  def run(device_state):
    metrics = evaluate(predictor, device_state, eval_loader, ground_truth, iou_types=types,
                       segm_score_key=score_key)
    if num_images <= 0 or jax.process_count() > 1:
      return metrics
    if not first_batch:
      first_batch.update(next(iter(eval_loader)))
    outputs = predictor(device_state, first_batch)
    return metrics, {'eval/examples': example_panels(
        outputs, first_batch, num_images, config.dataset.mean, config.dataset.std, class_names)}

  return run


def format_metrics(metrics: dict[str, float]) -> str:
  keys = [k for k in ('bbox_AP', 'bbox_AP50', 'segm_AP', 'segm_AP50') if k in metrics]
  return ' '.join(f'{k}={metrics[k]:.4f}' for k in keys)
