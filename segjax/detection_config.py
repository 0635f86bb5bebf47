"""Configs of the instance-segmentation models (Faster / Mask / Mask Scoring R-CNN).

`detection_config(name, preset)` is what configs/{faster_rcnn,mask_rcnn,ms_rcnn}_r50_fpn.py
return; `validate_detection_config` checks one before anything is built. A detection
config carries `task = 'instance'`, which `segjax.main` dispatches on.
"""

from __future__ import annotations

import numbers

import ml_collections

from segjax import base_config
from segjax.data import coco, instance_pipeline
from segjax.models.detection import mask_rcnn
from segjax.train import init_from, loop, loss_scale, optimizers, parallel

TASK = 'instance'
PRESETS = ('digit_scenes', 'coco')
SCHEDULES = optimizers.SCHEDULES + ('step',)

_POSITIVE_INTS = ('num_train_steps', 'batch_size', 'eval_batch_size', 'eval_every_steps',
                  'checkpoint_every_steps', 'log_every_steps', 'keep_checkpoints')


def get_detection_base_config(name: str = 'mask_rcnn') -> ml_collections.ConfigDict:
  """Shared fields (seed, optimizer, parallel, step counts) with a detector's model and
  instance dataset sections."""
  config = base_config.get_base_config()
  detection = ml_collections.ConfigDict()
  detection.task = TASK
  for field in ('seed', 'parallel', 'num_train_steps', 'batch_size', 'eval_batch_size',
                'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints', 'keep_best_checkpoints', 'nonfinite',
                'conv_weight_grad', 'prefetch_to_device', 'loss_scaling', 'init_from'):
    detection[field] = config[field]
  detection.model = mask_rcnn.default_detection_model_config(name)
  detection.dataset = instance_pipeline.default_instance_dataset_config()
  # Validation images drawn with ground truth | detections in TensorBoard at each
  # evaluation (segjax.visualize); 0: none.
  detection.eval = ml_collections.ConfigDict(dict(num_images=config.eval.num_images))
  optimizer = config.optimizer
  # 'step': lr x decay_factor at each of decay_steps (Detectron's 1x schedule).
  optimizer.decay_steps = (60000, 80000)
  optimizer.decay_factor = 0.1
  detection.optimizer = optimizer
  return detection


def detection_config(name: str, preset: str | None) -> ml_collections.ConfigDict:
  """`name` in DETECTION_MODELS at a preset.

  digit_scenes: sized for a 2-core CPU, a few minutes of training: a half-width ResNet-18
    trained from scratch (BatchNorm trained), narrow FPN (64) and heads (box 256, mask
    32), anchors 8..128 px for 14-30 px digits on 64x64 scenes, fewer proposals and RoIs
    (256 post-NMS proposals, 64 sampled RoIs, 16 mask slots), AdamW 2e-3 cosine,
    600 steps of batch 8 (~0.8 s/step on a loaded 2-core CPU).
  coco: the Detectron / torchvision 1x schedule: ResNet-50-FPN (frozen BatchNorm,
    ImageNet weights to be imported), images resized to 800 (short) / 1333 (long) and
    padded to 1344x1344, batch 16, SGD lr 0.02 momentum 0.9 weight decay 1e-4, linear
    warmup 1000 iterations from lr/1000, 90k iterations with lr x0.1 at 60k and 80k,
    horizontal flips. Data: `coco_instances` (segjax.data.coco), built once from the
    downloaded files; 81 classes (80 contiguous labels + background; torchvision's
    91-way heads index by COCO category id, `coco.CATEGORY_IDS` maps between them).
  """
  preset = base_config.check_preset(preset, PRESETS)
  config = get_detection_base_config(name)
  m, d, o = config.model, config.dataset, config.optimizer
  if preset == 'digit_scenes':
    m.backbone = 'resnet18'
    m.width_multiplier = 0.5
    m.fpn_channels = 64
    m.representation_size = 256
    m.mask_head_channels = 32
    m.anchor_sizes = (8, 16, 32, 64, 128)
    m.rpn_pre_nms_top_n_train = 1000
    m.rpn_pre_nms_top_n_test = 500
    m.rpn_post_nms_top_n_train = 256
    m.rpn_post_nms_top_n_test = 128
    m.rpn_batch_size_per_image = 128
    m.box_batch_size_per_image = 64  # 16 mask-branch slots (the mask head's cost)
    m.box_detections_per_img = 20
    o.name = 'adamw'
    o.learning_rate = 2e-3
    o.weight_decay = 1e-4
    o.schedule = 'cosine'
    o.warmup_steps = 50
    o.grad_clip_norm = 10.0
    config.batch_size = 8
    config.eval_batch_size = 50
    config.num_train_steps = 600
    config.log_every_steps = 25
    config.eval_every_steps = 600
    config.checkpoint_every_steps = 200
  else:
    m.backbone = 'resnet50'
    m.freeze_bn = True
    d.name = 'coco_instances'  # python -m segjax.data.build --dataset=coco_instances ...
    d.num_classes = coco.NUM_CLASSES  # 80 categories (contiguous labels) + background
    d.min_size, d.max_size = 800, 1333
    d.pad_size = (1344, 1344)
    d.max_instances = 100
    d.hflip = True
    d.mean = (123.675, 116.28, 103.53)  # torchvision's ImageNet normalisation
    d.std = (58.395, 57.12, 57.375)
    d.prefetch = 16  # JPEGs decode in reader threads (instance_pipeline.py)
    o.name = 'sgd'
    o.learning_rate = 0.02
    o.momentum = 0.9
    o.weight_decay = 1e-4
    o.schedule = 'step'
    o.decay_steps = (60000, 80000)
    o.decay_factor = 0.1
    o.warmup_steps = 1000
    o.warmup_init_factor = 0.001
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_train_steps = 90000
    config.log_every_steps = 100
    config.eval_every_steps = 10000
    config.checkpoint_every_steps = 2500
  return config


def validate_detection_config(config) -> None:
  """Raises ValueError naming the bad field, its value and the valid choices."""
  if config.get('task') != TASK:
    raise ValueError(f'config.task={config.get("task")!r} is not {TASK!r}')
  if config.parallel not in parallel.DRIVERS:
    raise ValueError(f'config.parallel={config.parallel!r} is not one of {parallel.DRIVERS}')
  for name in _POSITIVE_INTS:
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f'config.{name}={value!r} must be a positive integer')
  loop.validate_nonfinite_policy(config.nonfinite)
  loop.validate_conv_weight_grad(config.conv_weight_grad)
  loop.validate_prefetch_to_device(config.get('prefetch_to_device', 0))
  loss_scale.validate_loss_scaling(config.get('loss_scaling', 'auto'))
  validate_num_images(config)
  if 'init_from' in config:  # configs saved before the field existed have none
    init_from.validate_config(config.init_from)
  mask_rcnn.validate_detection_model_config(config.model)
  validate_detection_optimizer(config.optimizer)
  instance_pipeline.validate_instance_dataset_config(config.dataset)


def validate_num_images(config) -> None:
  """config.eval.num_images: a non-negative int (shared with the semantic configs)."""
  value = config.get('eval', {}).get('num_images', 0)
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f'config.eval.num_images={value!r} must be an integer >= 0 '
                     '(validation images drawn in TensorBoard; 0: none)')


def validate_detection_optimizer(opt_config) -> None:
  if opt_config.schedule not in SCHEDULES:
    raise ValueError(f'config.optimizer.schedule={opt_config.schedule!r} is not one of '
                     f'{SCHEDULES}')
  if opt_config.schedule == 'step':
    steps = tuple(opt_config.decay_steps)
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in steps) \
        or list(steps) != sorted(steps):
      raise ValueError(f'config.optimizer.decay_steps={steps!r} must be increasing positive ints')
    if not 0 < opt_config.decay_factor <= 1:
      raise ValueError(f'config.optimizer.decay_factor={opt_config.decay_factor!r} must be in '
                       '(0, 1]')
    probe = ml_collections.ConfigDict(opt_config.to_dict())
    probe.schedule = 'constant'
    optimizers.validate_optimizer_config(probe)
  else:
    optimizers.validate_optimizer_config(opt_config)
