"""Defaults shared by every config in configs/; each config file overrides what it needs."""

from __future__ import annotations

import ml_collections

from segjax.data.pipeline import default_dataset_config
from segjax.models import DEEPLAB_MODELS, crf, deeplab, default_model_config
from segjax.train import init_from


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
      # DeepLab v1/v2: loss on the stride-s logits against labels subsampled by s;
      # False: on the logits upsampled to the labels (FCN; DeepLab v3 §4).
      downsample_labels=False,
  ))
  config.eval = ml_collections.ConfigDict(dict(
      # Test-time augmentation: softmax probabilities averaged over these input scales
      # and, with flip, their mirror images. (1.0,) and no flip = plain argmax.
      tta=ml_collections.ConfigDict(dict(scales=(1.0,), flip=False)),
      crf=crf.default_crf_config(),  # dense CRF post-processing, off by default
      # Validation images drawn with ground truth | prediction in TensorBoard at each
      # evaluation, plus the confusion matrix (segjax.visualize); 0: no images.
      num_images=4,
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
  # Start from converted weights (python -m segjax.convert); see segjax/train/init_from.py.
  config.init_from = init_from.default_config()
  # A step with a non-finite loss or gradient never updates the state. 'stop': fail
  # naming the step (the latest checkpoint is the last good state); 'skip': count it
  # in the train metrics ('skipped_steps') and go on. See segjax/train/loop.py.
  config.nonfinite = 'stop'
  # How convolutions are computed (segjax.models.layers.CONV_WEIGHT_GRADS): 'xla', or
  # matmuls: 'tap_matmuls' (both gradients of the wide, 1x1 and mostly-padding convs as
  # matmuls, the forward of 1x1 and mostly-padding dilated convs, e.g. ASPP's, as per-tap
  # matmuls, the wide dense 3x3 convs' forward and both gradients by Winograd, ~85 MB
  # more scratch in FCN-ResNet50 inference), 'tap_matmuls_nested' (the same for convs
  # inside a conditional; set by the Mask R-CNN mask branch), 'taps' / 'taps_1x1'
  # (filter gradient only). Same values to float rounding. 'auto': 'tap_matmuls' when
  # JAX's default backend is the CPU (DeepLabV3-ResNet50 inference 0.59x -> 1.29x
  # torchvision's speed, train step 0.50x -> 1.16x; experiments/benchmarks), 'xla' on
  # GPU/TPU.
  config.conv_weight_grad = 'auto'
  # Batches put on the devices ahead of the step that uses them, so the host-to-device
  # copy overlaps the running step (segjax.train.loop.DevicePrefetch); 0: put each batch
  # just before its step. Checkpoints record the input position of the last batch used.
  config.prefetch_to_device = 2
  # 'auto': dynamic loss scaling when model.dtype is 'float16' (not needed for bfloat16);
  # 'dynamic' always; 'none' never (segjax.train.loss_scale).
  config.loss_scaling = 'auto'
  return config


def check_preset(preset: str | None, presets: tuple[str, ...]) -> str:
  """The preset name, defaulting to the first; raises naming the valid presets."""
  preset = preset or presets[0]
  if preset not in presets:
    raise ValueError(f'unknown preset {preset!r}; valid presets: {presets}')
  return preset


FCN_PRESETS = ('digit_scenes', 'voc', 'cityscapes')


def fcn_config(variant: str, preset: str | None) -> ml_collections.ConfigDict:
  """FCN-32s/16s/8s (Long et al., CVPR 2015) at a preset's settings.

  digit_scenes: a quarter-width ResNet-18 with a stride-1 stem (model.stem_stride=1, so
    FCN-8s predicts at stride 2 of the 64x64 scenes; with torchvision's stride-4 stem
    it predicts at stride 8, too coarse for 2-4 px digit strokes), trained on 48x48
    crops for 3,800 steps and evaluated on whole scenes at three input scales
    (eval.tta.scales=(1.0, 1.25, 1.5), averaged softmax; single-scale scores are lower),
    sized for a 2-core CPU (experiments/README.md).
  voc: the paper's network (full-width VGG-16, fc6 7x7, learnable bilinear-initialised
    deconvolutions, §3.3 and §4.2) on PASCAL VOC 2012 with batch 20, momentum 0.9 and
    weight decay 5e-4 (§4.1). The paper sums the loss over pixels with a fixed lr of
    1e-4; segjax averages over labelled pixels, so the lr is that of MMSegmentation's
    FCN configs (0.01, poly) rather than the paper's number. Data: `voc_segmentation/aug`,
    train_aug (the paper trains on SBD's 8,498 train images; train_aug adds VOC train and
    SBD val minus VOC val) and VOC val.
  """
  preset = check_preset(preset, FCN_PRESETS)
  config = get_base_config()
  config.model.name = variant
  config.model.upsampling = 'deconv'
  if preset == 'digit_scenes':
    # A small ResNet-18 trains from scratch in minutes on a 2-core CPU; a quarter-width
    # VGG-16 (no BN) ran 2x slower and stayed at the all-background solution for the
    # first 500 steps. The stride-1 stem at 1/8 width and 48x48 training crops beat the
    # torchvision stem at 1/4 width on 64x64 crops by 0.24 mIoU in a similar time
    # (experiments/README.md, "Choosing the digit_scenes preset").
    config.model.backbone = 'resnet18'
    # Quarter width over 3,800 steps beat eighth width over 5,000 in less time (0.825 vs
    # 0.787 single-scale); widening only res4/res5 did not (experiments/README.md).
    config.model.width_multiplier = 0.25
    config.model.stem_stride = 1
    config.model.fc_kernel_size = 3
    config.model.dropout_rate = 0.0
    config.dataset.name = 'digit_scenes'
    config.dataset.crop_size = (48, 48)
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
    config.num_train_steps = 3800
    # Upscaled views help most at 2-4 px strokes on a stride-2 grid: +0.034 mIoU on the
    # same weights (experiments/README.md). The training scale range stays (0.75, 1.25).
    config.eval.tta.scales = (1.0, 1.25, 1.5)
    config.log_every_steps = 250
    config.eval_every_steps = 2000  # and at the end; a three-scale eval takes ~11 s here
    config.checkpoint_every_steps = 500
  else:
    config.model.backbone = 'vgg16'
    config.model.width_multiplier = 1.0
    config.model.fc_kernel_size = 7
    config.model.dropout_rate = 0.5
    _voc_data(config)
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
  if preset == 'cityscapes':
    _cityscapes_training(config)
  return config


DEEPLAB_PRESETS = ('digit_scenes', 'voc', 'cityscapes')

# Test-time scales of DeepLab v3 §4 ("inference strategy": multi-scale inputs
# {0.5, 0.75, 1.0, 1.25, 1.5, 1.75} and left-right flipped inputs, averaged).
V3_EVAL_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def deeplab_config(variant: str, preset: str | None) -> ml_collections.ConfigDict:
  """DeepLab v1 / v2 / v3 / v3+ at a preset's settings (`variant`: a DEEPLAB_MODELS name).

  digit_scenes: sized for a 2-core CPU, trained from scratch with AdamW + cosine like
    the FCN preset. v1: quarter-width VGG-16-BN at output stride 8 on 64x64 crops, 3,000
    steps (VGG without BN stays at the all-background solution from scratch,
    experiments/README.md). v2, v3, v3+: eighth-width ResNet-18 with a stride-2 stem
    (model.stem_stride=2, so output stride 8 puts the head at stride 4 and v3+'s decoder
    at 2: the digits' 2-4 px strokes vanish on a stride-8 grid), 48x48 crops, 5,000
    steps, He-initialised fc6/fc7 (v2) -- about 10 minutes a run. The heads keep the
    papers' rates, so on 12x12 maps the large rates see mostly padding (the
    degeneration DeepLab v3 §3.3 describes). No flips anywhere: a mirrored 2 is not a 2.
  voc: the papers' settings on PASCAL VOC 2012 + SBD (train_aug, 10,582 images; eval on val):
    v1 ([v1] §5 "Training"): VGG-16, batch 20, lr 1e-3, momentum 0.9, weight decay
      5e-4, 6000 iterations (the released LargeFOV solver: lr x0.1 every 2000; segjax
      has no step schedule, so poly 0.9 as v2 found better, [v2] §4.1), loss against
      labels subsampled by 8 ([v1] §3.1), dense CRF at evaluation ([v1] §4.2).
    v2 ([v2] §4.1): ResNet-101, 'poly' power 0.9, batch 10, 20K iterations, momentum
      0.9, weight decay 5e-4, lr 2.5e-4 (the released ResNet-101 solver; the paper's
      1e-3 is VGG-16's), random scaling 0.5-1.5, multi-scale inputs {1, 0.75, 0.5}
      max-fused, BatchNorm frozen, labels subsampled by 8, dense CRF at evaluation.
    v3, v3+ ([v3] §4, [v3+] §4): ResNet-101 at output stride 16, 'poly' power 0.9, lr
      7e-3, crop 513, batch 16, 30K iterations, BN trained, random scaling 0.5-2.0 and
      flips, loss on upsampled logits; weight decay 1e-4 (not given in the paper; the
      value of torchvision's DeepLab v3 recipe); evaluation with scales
      {0.5, ..., 1.75} and flips averaged. v3 has no CRF.
  Crops are 321 x 321 for v1/v2 (the released DeepLab v2 models' crop; the papers do
  not state it).
  """
  if variant not in DEEPLAB_MODELS:
    raise ValueError(f'{variant!r} is not a DeepLab model; choose one of '
                     f'{sorted(DEEPLAB_MODELS)}')
  preset = check_preset(preset, DEEPLAB_PRESETS)
  version = ('v1' if variant in deeplab.V1_FC6 else
             'v2' if variant.startswith('deeplab_v2') else 'v3')
  config = get_base_config()
  config.model = default_model_config(variant)
  config.loss.downsample_labels = version in ('v1', 'v2')
  if preset == 'digit_scenes':
    _digit_scenes_training(config)
    config.model.dropout_rate = 0.0
    config.model.output_stride = 8
    if version == 'v1':
      config.model.backbone = 'vgg16_bn'
      config.model.width_multiplier = 0.25
    else:
      # With the torchvision stem (stride-8 heads, quarter width, 64x64 crops, 3,000
      # steps) ASPP-S/-L stayed near all-background (val mIoU 0.09 / 0.10) and v3+
      # reached 0.535 (experiments/README.md).
      config.model.backbone = 'resnet18'
      config.model.width_multiplier = 0.125
      config.model.stem_stride = 2
      config.model.fc_init = 'he'
      config.dataset.crop_size = (48, 48)
      config.num_train_steps = 5000
  else:
    _voc_dataset(config, crop=513 if version == 'v3' else 321)
    config.optimizer.name = 'sgd'
    config.optimizer.schedule = 'poly'
    config.optimizer.power = 0.9
    config.optimizer.momentum = 0.9
    config.model.dropout_rate = 0.5
    if version == 'v1':
      config.model.backbone = 'vgg16'
      config.dataset.scale_range = (1.0, 1.0)
      config.optimizer.learning_rate = 1e-3
      config.optimizer.weight_decay = 5e-4
      config.batch_size = 20
      config.num_train_steps = 6000
      config.eval.crf.enabled = True
    elif version == 'v2':
      config.model.backbone = 'resnet101'
      config.model.input_scales = deeplab.V2_INPUT_SCALES
      config.model.freeze_bn = True
      config.dataset.scale_range = (0.5, 1.5)
      config.optimizer.learning_rate = 2.5e-4
      config.optimizer.weight_decay = 5e-4
      config.batch_size = 10
      config.num_train_steps = 20000
      config.eval.crf.enabled = True
    else:
      config.model.backbone = 'resnet101'
      config.model.output_stride = 16
      config.dataset.scale_range = (0.5, 2.0)
      config.optimizer.learning_rate = 7e-3
      config.optimizer.weight_decay = 1e-4
      config.batch_size = 16
      config.num_train_steps = 30000
      config.eval.tta.scales = V3_EVAL_SCALES
      config.eval.tta.flip = True
    config.eval_batch_size = config.batch_size
    config.eval_every_steps = config.num_train_steps // 10
    config.checkpoint_every_steps = 1000
  if preset == 'cityscapes':
    _cityscapes_training(config)
  return config


def _digit_scenes_training(config: ml_collections.ConfigDict) -> None:
  """digit_scenes data and the FCN preset's optimiser (AdamW 1e-2, cosine), no flips."""
  config.dataset.name = 'digit_scenes'
  config.dataset.crop_size = (64, 64)
  config.dataset.eval_pad_size = (64, 64)
  config.dataset.scale_range = (0.75, 1.25)
  config.dataset.hflip = False  # a mirrored 2 is not a 2
  config.eval.tta.flip = False
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-2
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_steps = 100
  config.batch_size = 16
  config.eval_batch_size = 100
  config.num_train_steps = 3000
  config.log_every_steps = 250
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 500


def _voc_data(config: ml_collections.ConfigDict) -> None:
  """PASCAL VOC 2012 with SBD: train on train_aug (10,582), evaluate on val (1,449).

  Build once: python -m segjax.data.build --dataset=voc_segmentation/aug
  --manual_dir=/path/VOCdevkit --data_dir=... (README, "Datasets").
  """
  config.dataset.name = 'voc_segmentation/aug'
  config.dataset.train_split = 'train_aug'
  config.dataset.eval_split = 'validation'
  config.dataset.num_classes = 21
  config.dataset.ignore_label = 255
  # torchvision's ImageNet normalisation, which the imported backbones expect.
  config.dataset.mean = (123.675, 116.28, 103.53)
  config.dataset.std = (58.395, 57.12, 57.375)
  config.dataset.prefetch = 16  # JPEGs decode in reader threads (pipeline.py)


def _voc_dataset(config: ml_collections.ConfigDict, crop: int) -> None:
  _voc_data(config)
  config.dataset.crop_size = (crop, crop)
  config.dataset.eval_pad_size = (512, 512) if crop < 512 else (crop, crop)
  config.dataset.hflip = True


def _cityscapes_training(config: ml_collections.ConfigDict) -> None:
  """The 'voc' preset's model on Cityscapes fine (train 2,975 / val 500, 19 train ids).

  The papers' Cityscapes recipes differ per model; this uses MMSegmentation's common
  Cityscapes schedule for all of them: crop 512 x 1024, batch 8, 80k iterations, SGD lr
  0.01 'poly' 0.9, momentum 0.9, weight decay 5e-4, random scaling 0.5-2.0 and flips,
  evaluation on the whole 1024 x 2048 images. No dense CRF (its parameters were fit on
  VOC). Build once: python -m segjax.data.build --dataset=cityscapes_semantic
  --manual_dir=/path/cityscapes --data_dir=... (README, "Datasets").
  """
  d = config.dataset
  d.name = 'cityscapes_semantic'
  d.train_split, d.eval_split = 'train', 'validation'
  d.num_classes = 19
  d.ignore_label = 255
  d.crop_size = (512, 1024)
  d.eval_pad_size = (1024, 2048)
  d.scale_range = (0.5, 2.0)
  d.hflip = True
  d.mean = (123.675, 116.28, 103.53)
  d.std = (58.395, 57.12, 57.375)
  d.prefetch = 16  # full-size PNGs decode in reader threads (pipeline.py)
  o = config.optimizer
  o.name, o.schedule, o.power = 'sgd', 'poly', 0.9
  o.learning_rate, o.momentum, o.weight_decay, o.warmup_steps = 0.01, 0.9, 5e-4, 0
  config.eval.crf.enabled = False
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_train_steps = 80000
  config.eval_every_steps = 8000
  config.checkpoint_every_steps = 4000
