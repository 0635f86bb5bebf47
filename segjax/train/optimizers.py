"""Optax optimizers and learning-rate schedules built from `config.optimizer`."""

from __future__ import annotations

import jax
import optax

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('poly', 'cosine', 'constant')


def validate_optimizer_config(opt_config) -> None:
  """Raises ValueError naming the bad field value and the valid choices."""
  if opt_config.name not in OPTIMIZERS:
    raise ValueError(f'config.optimizer.name={opt_config.name!r} is not one of {OPTIMIZERS}')
  if opt_config.schedule not in SCHEDULES:
    raise ValueError(f'config.optimizer.schedule={opt_config.schedule!r} is not one of {SCHEDULES}')
  if not opt_config.learning_rate > 0:
    raise ValueError(f'config.optimizer.learning_rate={opt_config.learning_rate!r} must be > 0')
  if opt_config.warmup_steps < 0:
    raise ValueError(f'config.optimizer.warmup_steps={opt_config.warmup_steps!r} must be >= 0')
  if opt_config.weight_decay < 0:
    raise ValueError(f'config.optimizer.weight_decay={opt_config.weight_decay!r} must be >= 0')


def learning_rate_schedule(opt_config, num_train_steps: int) -> optax.Schedule:
  """Linear warmup, then poly (DeepLab's `(1 - step/max)^power`), cosine or constant."""
  base = opt_config.learning_rate
  warmup = min(opt_config.warmup_steps, num_train_steps)
  decay_steps = max(num_train_steps - warmup, 1)
  if opt_config.schedule == 'poly':
    main = optax.polynomial_schedule(base, 0.0, opt_config.power, decay_steps)
  elif opt_config.schedule == 'cosine':
    main = optax.cosine_decay_schedule(base, decay_steps)
  else:
    main = optax.constant_schedule(base)
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(base * opt_config.warmup_init_factor, base, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def decay_mask(params):
  """True for weights that get weight decay: kernels, not biases or BatchNorm scales."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def build_optimizer(opt_config, num_train_steps: int) -> optax.GradientTransformation:
  validate_optimizer_config(opt_config)
  schedule = learning_rate_schedule(opt_config, num_train_steps)
  if opt_config.name == 'sgd':
    tx = optax.chain(
        optax.add_decayed_weights(opt_config.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=opt_config.momentum or None,
                  nesterov=opt_config.nesterov))
  else:
    tx = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2,
                     weight_decay=opt_config.weight_decay, mask=decay_mask)
  if opt_config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), tx)
  return tx
