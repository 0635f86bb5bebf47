"""segjax's side of a benchmark: the jitted train step or inference of a config's model.

The train step is the one the trainers run (`steps.bind_train_step`,
`detection_trainer.bind_train_step`: forward, backward, optimizer update) jitted with
the state donated, fed back step after step. Inference is `steps.predict` (semantic:
logits at input resolution) or `detection_trainer.predict` plus the masks pasted into
the image (`mask_rcnn.paste_masks_in_image`), which torchvision's postprocess does too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax.benchmarks import inputs
from segjax.benchmarks.measure import Workload, compile_monitor, xla_flops
from segjax.models import build_model
from segjax.models.detection import mask_rcnn
from segjax.train import detection_trainer, loss_scale, optimizers, steps
from segjax.train.state import TrainState, call_jitted_once

MODES = ('train', 'infer')


def is_instance(config: ml_collections.ConfigDict) -> bool:
  return detection_trainer.is_instance_config(config)


def prepare_config(config: ml_collections.ConfigDict, batch_size: int,
                   image_size: tuple[int, int]) -> ml_collections.ConfigDict:
  """A copy of `config` at the benchmark's batch and image size (no data is read)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.batch_size = batch_size
  if is_instance(config):
    config.dataset.pad_size = tuple(image_size)
  else:
    config.dataset.crop_size = tuple(image_size)
  return config


def create_state(config: ml_collections.ConfigDict) -> TrainState:
  """The initial state, initialised under jit (eager init of a ResNet-50 is slow)."""
  if is_instance(config):
    return detection_trainer.create_state(config)
  model = build_model(config.model, num_classes=config.dataset.num_classes)
  tx = optimizers.build_optimizer(config.optimizer, config.num_train_steps)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  height, width = config.dataset.crop_size
  variables = jax.device_get(call_jitted_once(
      functools.partial(model.init, train=False), {'params': init_rng, 'dropout': init_rng},
      jnp.zeros((1, height, width, 3), jnp.float32)))
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    rng=state_rng, apply_fn=model.apply, tx=tx,
                    loss_scale=loss_scale.initial(config))


def make_batch(config: ml_collections.ConfigDict, batch_size: int,
               image_size: tuple[int, int], num_instances: int = 4) -> dict[str, np.ndarray]:
  if is_instance(config):
    return inputs.instance_batch(batch_size, image_size, config.dataset.num_classes,
                                 config.dataset.max_instances, num_instances, seed=config.seed)
  return inputs.semantic_batch(batch_size, image_size, config.dataset.num_classes,
                               seed=config.seed)


def compile_step(config: ml_collections.ConfigDict, mode: str,
                 batch: dict[str, np.ndarray]) -> jax.stages.Compiled:
  """A semantic config's `mode` step on `batch`, compiled, never run: jitted as
  `workload` jits it (train: the state donated; inference: no optimizer moments)."""
  state = create_state(config)
  if mode == 'infer':
    return jax.jit(steps.predict).lower(state.replace(opt_state=()), batch['image']).compile()
  step = steps.bind_train_step(config, axis_name=None)
  images = {'image': batch['image'], 'label': batch['label']}
  return jax.jit(step, donate_argnums=(0,)).lower(state, images).compile()


def temporaries_mb(config: ml_collections.ConfigDict, mode: str,
                   batch: dict[str, np.ndarray]) -> float:
  """XLA's temporaries (`memory_analysis()`, MB) of `compile_step`'s step."""
  return compile_step(config, mode, batch).memory_analysis().temp_size_in_bytes / 2**20


def _instance_infer(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  out = detection_trainer.predict(state, batch)
  size = batch['image'].shape[1:3]
  if 'mask_probs' in out:
    out['masks'] = jax.vmap(lambda m, b: mask_rcnn.paste_masks_in_image(m, b, size))(
        out.pop('mask_probs'), out['boxes'])
  return out


def workload(config: ml_collections.ConfigDict, mode: str, batch: dict[str, np.ndarray],
             *, name: str = 'segjax', same_state: bool = False) -> Workload:
  """The segjax `mode` step of `config` on `batch` (host arrays), ready to time.

  `same_state` (train): every step starts from the initial state, restored untimed
  before it (`Workload.before_step`), so each step is the same computation even where
  its cost depends on the training state (Mask R-CNN's sampled positives).
  """
  if mode not in MODES:
    raise ValueError(f'mode={mode!r} is not valid; choose one of {MODES}')
  state = create_state(config)
  if mode == 'infer':
    state = state.replace(opt_state=())  # inference holds no optimizer moments
  state = jax.device_put(state)
  # Tracing and lowering happen in xla_flops below; the harness adds them to the
  # compile time of the warm-up step.
  traced_before = compile_monitor().snapshot()[1]
  images = batch['image'].shape[0]
  if mode == 'train':
    if is_instance(config):
      step_fn = detection_trainer.bind_train_step(config)
      device_batch = jax.device_put(batch)
    else:
      step_fn = steps.bind_train_step(config, axis_name=None)
      device_batch = jax.device_put({'image': batch['image'], 'label': batch['label']})
    # The state is donated: XLA updates parameters and optimizer moments in place.
    jitted = jax.jit(step_fn, donate_argnums=(0,))
    flops = xla_flops(jitted, state, device_batch)
    holder = {'state': state}
    before_step = None
    if same_state:
      initial = state  # never donated: before_step gives each step a copy

      def before_step():
        holder['state'] = jax.block_until_ready(
            jax.tree.map(lambda x: jnp.array(x, copy=True), initial))

    def step():
      holder['state'], metrics = jitted(holder['state'], device_batch)
      jax.block_until_ready((holder['state'], metrics))
      return metrics
  else:
    if is_instance(config):
      infer_fn = _instance_infer
      device_batch = jax.device_put({'image': batch['image'], 'image_size': batch['image_size']})
    else:
      infer_fn = steps.predict
      device_batch = jax.device_put(batch['image'])

    def infer(state, images):
      return infer_fn(state, images)

    # A jit of its own function: `jax.jit(steps.predict)` would share its executable
    # cache with every other jit of `steps.predict` in the process, and `cache_size`
    # would count their compilations too.
    jitted = jax.jit(infer)
    flops = xla_flops(jitted, state, device_batch)

    before_step = None

    def step():
      jax.block_until_ready(jitted(state, device_batch))

  return Workload(name=name, step=step, images_per_step=images, flops_per_step=flops,
                  before_step=before_step, cache_size=jitted._cache_size,
                  info={'trace_lower_s': compile_monitor().snapshot()[1] - traced_before})
