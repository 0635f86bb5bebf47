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


FCN_PRESETS = ('digit_scenes', 'voc')


def fcn_config(variant: str, preset: str | None) -> ml_collections.ConfigDict:
  """FCN-32s/16s/8s (Long et al., CVPR 2015) at a preset's settings.

  digit_scenes: a quarter-width ResNet-18 on 64x64 scenes, sized for a 2-core CPU.
  voc: the paper's network (full-width VGG-16, fc6 7x7, learnable bilinear-initialised
    deconvolutions, §3.3 and §4.2) on PASCAL VOC 2012 with batch 20, momentum 0.9 and
    weight decay 5e-4 (§4.1). The paper sums the loss over pixels with a fixed lr of
    1e-4; segjax averages over labelled pixels, so the lr is that of MMSegmentation's
    FCN configs (0.01, poly) rather than the paper's number.
  """
  preset = check_preset(preset, FCN_PRESETS)
  config = get_base_config()
  config.model.name = variant
  config.model.upsampling = 'deconv'
  if preset == 'digit_scenes':
    # A quarter-width ResNet-18 trains from scratch on 64x64 scenes in minutes on a
    # 2-core CPU; a quarter-width VGG-16 (no BN) ran 2x slower and stayed at the
    # all-background solution for the first 500 steps (experiments/README.md).
    config.model.backbone = 'resnet18'
    config.model.width_multiplier = 0.25
    config.model.fc_kernel_size = 3
    config.model.dropout_rate = 0.0
    config.dataset.name = 'digit_scenes'
    config.dataset.crop_size = (64, 64)
    config.dataset.eval_pad_size = (64, 64)
    config.dataset.scale_range = (0.75, 1.25)
    config.dataset.hflip = False  # a mirrored 2 is not a 2
    config.optimizer.name = 'adamw'
    config.optimizer.learning_rate = 1e-2
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = 'cosine'
    config.optimizer.warmup_steps = 100
    config.batch_size = 16
    config.eval_batch_size = 100
    config.num_train_steps = 5000
    config.log_every_steps = 250
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 500
  else:
    config.model.backbone = 'vgg16'
    config.model.width_multiplier = 1.0
    config.model.fc_kernel_size = 7
    config.model.dropout_rate = 0.5
    config.dataset.name = 'voc_segmentation'
    config.dataset.num_classes = 21
    config.dataset.crop_size = (512, 512)
    config.dataset.eval_pad_size = (512, 512)
    config.dataset.scale_range = (1.0, 1.0)
    config.dataset.hflip = True
    config.optimizer.learning_rate = 0.01
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 5e-4
    config.batch_size = 20
    config.eval_batch_size = 20
    config.num_train_steps = 20000
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 1000
  return config
