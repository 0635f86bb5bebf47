"""Defaults shared by every config in configs/; each config file overrides what it needs."""

from __future__ import annotations

import ml_collections

from segjax.data.pipeline import default_dataset_config
from segjax.models import default_model_config


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = default_model_config()
  config.dataset = default_dataset_config()
  config.optimizer = ml_collections.ConfigDict(dict(
      name='sgd',              # 'sgd' | 'adamw'
      learning_rate=0.01,
      momentum=0.9,
      nesterov=False,
      b1=0.9,
      b2=0.999,
      weight_decay=5e-4,       # masked off biases and BatchNorm parameters
      schedule='poly',         # 'poly' | 'cosine' | 'constant'
      power=0.9,               # poly: lr * (1 - step / steps) ** power (DeepLab v2 §4)
      warmup_steps=0,
      warmup_init_factor=0.1,
      grad_clip_norm=0.0,      # 0 = no clipping
  ))
  config.loss = ml_collections.ConfigDict(dict(
      class_weights=(),        # () = unweighted; else one weight per class
      aux_weight=0.4,          # torchvision's FCN/DeepLab auxiliary-loss weight
  ))
  config.parallel = 'jit'      # 'pmap' | 'jit'
  config.num_train_steps = 1000
  config.batch_size = 16       # global, over all devices and hosts
  config.eval_batch_size = 16
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  config.keep_best_checkpoints = 1
  return config


def check_preset(preset: str | None, presets: tuple[str, ...]) -> str:
  """The preset name, defaulting to the first; raises naming the valid presets."""
  preset = preset or presets[0]
  if preset not in presets:
    raise ValueError(f'unknown preset {preset!r}; valid presets: {presets}')
  return preset
