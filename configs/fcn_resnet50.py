"""torchvision's FCN-ResNet50: dilated ResNet-50 (output stride 8) + FCNHead (segjax.models.fcn_resnet).

Train and evaluate on the embedded digit_scenes dataset (built on first use):
  python -m segjax.main --config=configs/fcn_resnet50.py --workdir=/tmp/fcn_resnet50
Fine-tune torchvision weights (converted once with segjax.convert, see README.md):
  python -m segjax.convert --from=torchvision --arch=fcn_resnet50 \\
      --input=fcn_resnet50_coco-1167a1af.pth --output=/tmp/fcn_resnet50_tv
  python -m segjax.main --config=configs/fcn_resnet50.py:voc --workdir=runs/fcn_r50_voc \\
      --config.init_from.path=/tmp/fcn_resnet50_tv
torchvision's recipe on PASCAL VOC 2012 (build voc_segmentation/aug first: README.md, Datasets):
  python -m segjax.main --config=configs/fcn_resnet50.py:voc --workdir=runs/fcn_r50_voc
FCN-ResNet101: add --config.model.backbone=resnet101 (the voc preset's backbone is ResNet-50).
Expected result on digit_scenes: not measured yet.
"""

from segjax import base_config
from segjax.models import default_model_config

PRESETS = ('digit_scenes', 'voc')


def get_config(preset=None):
  """digit_scenes: quarter-width ResNet-18 at output stride 8 from scratch, the DeepLab
  presets' optimiser (2-core CPU). voc: torchvision's segmentation reference recipe
  (references/segmentation: SGD lr 0.02, momentum 0.9, weight decay 1e-4, poly 0.9,
  aux loss weight 0.5, batch 32, crop 480, random scaling 0.5-2.0 of 520, flips).
  """
  preset = base_config.check_preset(preset, PRESETS)
  config = base_config.get_base_config()
  config.model = default_model_config('fcn_resnet')
  if preset == 'digit_scenes':
    base_config._digit_scenes_training(config)
    config.model.backbone = 'resnet18'
    config.model.width_multiplier = 0.25
    config.model.dropout_rate = 0.0
  else:
    base_config._voc_dataset(config, crop=480)
    config.model.aux_loss = True
    config.loss.aux_weight = 0.5
    config.dataset.scale_range = (0.5, 2.0)
    config.optimizer.name = 'sgd'
    config.optimizer.learning_rate = 0.02
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = 'poly'
    config.optimizer.power = 0.9
    config.batch_size = 32
    config.eval_batch_size = 32
    config.num_train_steps = 30000
    config.eval_every_steps = 3000
    config.checkpoint_every_steps = 1000
  return config
