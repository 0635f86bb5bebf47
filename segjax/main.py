"""Trains and evaluates a segjax model.

  python -m segjax.main --config=configs/fcn8s.py --workdir=/tmp/fcn8s
  python -m segjax.main --config=configs/fcn8s.py:voc --workdir=runs/fcn8s_voc \
      --config.batch_size=20

Rerun the same command in the same workdir to resume. SIGTERM or Ctrl-C saves a
checkpoint of the current step first and exits with status 128 + signal number.

Several processes (one per host; README "Multi-host"): the same command on each,
plus `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, or
`--distributed=auto` where `jax.distributed.initialize()` finds the cluster itself
(Cloud TPU pod slices, SLURM). `--workdir` must be one directory all of them see.
"""

# Before the heavy imports: the command line may restart itself with glibc's malloc set to
# keep freed memory (--host_malloc, segjax/train/host_memory.py).
import sys

from segjax.train import host_memory  # no JAX import: the restart comes first

if __name__ == '__main__':
  host_memory.configure_from_argv(sys.argv)

import importlib.util
import logging as std_logging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from segjax import distributed
from segjax import config_validation
from segjax.train import checkpoints, detection_trainer, loop, trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:preset]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_LIBRARY_LOGS = flags.DEFINE_bool(
    'library_logs', False, "Show other libraries' INFO logs (Orbax logs every save step).")
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', None, distributed.MODES,
    "Multi-process runtime: 'manual' (the three flags below), 'auto' (Cloud TPU, SLURM: "
    "jax.distributed.initialize() detects the cluster) or 'off'. Default: 'manual' if "
    "--coordinator_address is given, else 'off'.")
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0, the same for every process.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "This process's id, 0..num_processes-1.")
_HOST_MALLOC = flags.DEFINE_enum('host_malloc', 'auto', host_memory.MODES,
                                  host_memory.FLAG_HELP)
flags.mark_flags_as_required(['config', 'workdir'])


class _OnlySegjaxInfo(std_logging.Filter):
  """Keeps segjax's INFO lines and every library's warnings and errors."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or f'{os.sep}segjax{os.sep}' in record.pathname


def _check_workdir(workdir: str) -> None:
  """A usable --workdir (created if missing), or exit status 1 with a line naming it."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise SystemExit(f'error: --workdir={workdir!r} is a file, not a directory; give a new or '
                         'existing directory (a run resumes from its checkpoints)')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise SystemExit(f'error: --workdir={workdir!r} cannot be created: {error}') from error
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise SystemExit(f'error: --workdir={workdir!r} is not writable')


def _unknown_field(argv: list[str]) -> str | None:
  """The first `--config.a.b=...` override naming a field the config lacks, described
  with the fields that do exist there; None if every override names a real field."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    return None
  path, _, preset = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('segjax_user_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(preset or None)
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    names = arg[len('--config.'):].split('=', 1)[0].split('.')
    node, where = config, 'config'
    for name in names:
      if not hasattr(node, 'keys') or name not in node:
        fields = sorted(node.keys()) if hasattr(node, 'keys') else []
        return (f'{arg.split("=", 1)[0]}: {where} has no field {name!r}; its fields are '
                f'{fields}')
      node, where = node[name], f'{where}.{name}'
  return None


def _parse_flags(argv: list[str]):
  """absl's parser, with one line instead of a traceback for an unknown config field."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    problem = _unknown_field(argv)
    if problem is None:
      raise
    raise SystemExit(f'error: {problem}') from None


def _check_config(config) -> None:
  """Every config error, including a batch the devices cannot split, as one line."""
  try:
    config_validation.validate_config(config)
    config_validation.validate_batch_split(config, jax.device_count())
  except ValueError as error:
    raise SystemExit(f'error: {error}') from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _check_workdir(_WORKDIR.value)
  # Before anything asks JAX for its devices: afterwards they are every process's.
  mode = _DISTRIBUTED.value or ('manual' if _COORDINATOR.value else 'off')
  try:
    distributed.initialize(mode, coordinator_address=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  except ValueError as error:
    raise app.UsageError(str(error)) from error
  _check_config(_CONFIG.value)
  logging.set_verbosity(logging.INFO)
  if not _LIBRARY_LOGS.value:
    logging.get_absl_handler().addFilter(_OnlySegjaxInfo())
  try:
    if detection_trainer.is_instance_config(_CONFIG.value):
      metrics = detection_trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
      logging.info('final eval: %s', detection_trainer.format_metrics(metrics))
      return
    metrics = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except loop.Interrupted as stopped:
    logging.error('%s', stopped)
    sys.exit(128 + stopped.signum)
  except (loop.NonFiniteLoss, checkpoints.CheckpointMismatch,
          checkpoints.NoReadableCheckpoint) as error:
    logging.error('%s', error)
    sys.exit(1)
  logging.info('final eval: miou=%.4f pixel_accuracy=%.4f', metrics['miou'],
               metrics['pixel_accuracy'])


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
