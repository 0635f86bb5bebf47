"""The converted-weights checkpoint: segjax variables + a little metadata, written by Orbax.

A directory written by `save_variables` (and so by `python -m segjax.convert`) holds
one Orbax checkpoint with two items:

  'variables'  {'params': ..., 'batch_stats': ...} exactly as the segjax module's
               `init` returns them (backbone-only archs sit under 'backbone', like
               the backbone of every FCN / DeepLab model);
  'metadata'   JSON: {'source', 'arch', 'input', 'segjax_model': the model config
               (or backbone name) the variables fit, 'num_classes'}.

`load_variables` reads it back as numpy arrays; `config.init_from` uses it
(`segjax.train.init_from`). No torch here.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

VARIABLES = 'variables'
METADATA = 'metadata'


def save_variables(directory: str, variables: dict[str, Any], metadata: dict[str, Any]) -> str:
  """Writes `variables` and `metadata` to `directory` (must not exist); returns its path."""
  # Orbax needs absolute paths; a relative one fails only later (DESIGN.md).
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(f'output directory {directory} already exists; choose a new one')
  variables = jax.tree_util.tree_map(np.asarray, dict(variables))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(directory, ocp.args.Composite(**{
        VARIABLES: ocp.args.StandardSave(variables),
        METADATA: ocp.args.JsonSave(metadata)}))
  return directory


def is_converted_checkpoint(directory: str) -> bool:
  return (os.path.isdir(os.path.join(directory, VARIABLES))
          and os.path.isdir(os.path.join(directory, METADATA)))


def load_variables(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables as numpy arrays, metadata) of a directory written by `save_variables`."""
  directory = os.path.abspath(directory)
  if not os.path.exists(directory):
    raise FileNotFoundError(f'checkpoint directory {directory} does not exist')
  if not is_converted_checkpoint(directory):
    raise ValueError(f'{directory} is not a segjax converted checkpoint (it needs the '
                     f'{VARIABLES!r} and {METADATA!r} items that `python -m segjax.convert` '
                     f'writes); found {sorted(os.listdir(directory))}')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(directory, ocp.args.Composite(**{
        VARIABLES: ocp.args.StandardRestore(),
        METADATA: ocp.args.JsonRestore()}))
  variables = jax.tree_util.tree_map(np.asarray, dict(restored[VARIABLES]))
  return variables, dict(restored[METADATA])
