"""Writes scalar metrics to WORKDIR/metrics.jsonl, TensorBoard event files and the log.

Evaluation pictures (`write_images`: ground truth | prediction panels, the confusion
matrix; see `segjax.visualize`) go to TensorBoard's Images tab only.

metrics.jsonl holds one JSON object per line: {"step": N, "split": "train"|"eval",
name: value, ...}. TensorBoard events are written with tensorboardX, which needs no
TensorFlow. Only process 0 writes, so multi-host runs produce one record.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np
from absl import logging


class MetricWriter:

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tensorboard = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {name: _to_json_number(value) for name, value in metrics.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), 'split': split, **values}) + '\n')
    for name, value in values.items():
      if value is not None:
        self._tensorboard.add_scalar(f'{split}/{name}', value, int(step))
    self._tensorboard.flush()

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """TensorBoard images, tag -> uint8 RGB [H, W, 3] (PNG-encoded in the event file)."""
    if not self.enabled or not images:
      return
    for tag, image in images.items():
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f'image {tag!r} must be uint8 [H, W, 3], got {image.dtype} '
                         f'{image.shape}')
      self._tensorboard.add_image(tag, image, int(step), dataformats='HWC')
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _to_json_number(value) -> float | None:
  value = float(value)
  return None if math.isnan(value) or math.isinf(value) else value


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl, optionally only one split's."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if split is None or r['split'] == split]


def log_train(step: int, num_train_steps: int, metrics: Mapping[str, float],
              steps_per_second: float, images_per_second: float) -> None:
  eta = (num_train_steps - step) / steps_per_second if steps_per_second > 0 else float('nan')
  text = ', '.join(f'{k}={float(v):.4g}' for k, v in metrics.items())
  logging.info('step %d/%d: %s | %.2f steps/s, %.1f img/s, ETA %s', step, num_train_steps,
               text, steps_per_second, images_per_second, _format_seconds(eta))


def _format_seconds(seconds: float) -> str:
  if math.isnan(seconds):
    return '?'
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours:d}:{minutes:02d}:{secs:02d}'
