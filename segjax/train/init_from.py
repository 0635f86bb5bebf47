"""`config.init_from`: start a run from converted (e.g. torchvision) weights.

    config.init_from.path = '/tmp/resnet101_tv'     # written by `python -m segjax.convert`
    config.init_from.subtrees = ('backbone',)        # () = every variable in the checkpoint

Applied when the trainer creates the initial state (`trainer.create_state`,
`detection_trainer.create_state`), before `loop.run` looks for the workdir's own
checkpoints: a run that resumes restores every array (params, batch_stats,
optimizer state) from its checkpoint, so init_from only ever shapes a fresh start
and never overrides a resume (tests/test_init_from.py). Each entry of `subtrees` is a '/'-separated path in the
checkpoint's variables (the same path in 'params' and 'batch_stats'), optionally
mapped to another path of the model with '->':

    ('backbone',)                          FCN / DeepLab from an ImageNet backbone
    ('backbone->backbone/body',)           Faster / Mask R-CNN from an ImageNet ResNet
    ('backbone', 'classifier/conv', 'classifier/bn')   fcn_resnet50 minus its last layer

Every variable under a selected path must exist in the model with the same shape
(a ValueError names the parameter and both shapes); everything else keeps its
fresh initialisation. A report of loaded / newly initialised / unused variables is
logged. The optimizer state is re-initialised from the loaded parameters.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from segjax.convert import checkpoint

SEPARATOR = '->'


def default_config() -> ml_collections.ConfigDict:
  """The `config.init_from` section; path '' = off."""
  return ml_collections.ConfigDict({
      'path': '',       # directory written by `python -m segjax.convert`; '' = random init
      'subtrees': (),   # checkpoint paths to load ('a/b' or 'a/b->model/path'); () = all
  })


def parse_subtrees(subtrees) -> list[tuple[str, str]]:
  """('backbone', 'backbone->backbone/body') -> [(src, dst), ...] with '/'-paths."""
  if isinstance(subtrees, str):
    raise ValueError(f'config.init_from.subtrees={subtrees!r} must be a tuple of paths, '
                     f"e.g. ('backbone',), not a string")
  pairs = []
  for entry in subtrees:
    if not isinstance(entry, str) or not entry.strip('/ '):
      raise ValueError(f'config.init_from.subtrees entry {entry!r} must be a non-empty path '
                       "such as 'backbone' or 'backbone->backbone/body'")
    src, arrow, dst = (part.strip().strip('/') for part in entry.partition(SEPARATOR))
    dst = dst if arrow else src
    if not src or not dst:
      raise ValueError(f'config.init_from.subtrees entry {entry!r} must be a non-empty path '
                       "such as 'backbone' or 'backbone->backbone/body'")
    pairs.append((src, dst))
  return pairs


def validate_config(init_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the bad field (the path itself is checked when loading)."""
  known = set(default_config().keys())
  given = set(init_config.keys())
  if given != known:
    raise ValueError(f'config.init_from fields differ from the schema: unknown '
                     f'{sorted(given - known)}, missing {sorted(known - given)}; known fields '
                     f'are {sorted(known)}')
  if not isinstance(init_config.path, str):
    raise ValueError(f'config.init_from.path={init_config.path!r} must be a directory path '
                     "(a string; '' = no init_from)")
  if init_config.path and not os.path.isdir(init_config.path):
    raise ValueError(f'config.init_from.path={init_config.path!r} is not a directory; convert '
                     'weights first (python -m segjax.convert --from=torchvision --arch=ARCH '
                     "--input=weights.pth --output=DIR) and pass DIR, or '' for random init")
  parse_subtrees(tuple(init_config.subtrees))


@dataclasses.dataclass
class Report:
  """'collection/path' names: loaded from the checkpoint, left at their fresh init, and
  checkpoint variables not used."""
  loaded: list[str]
  initialised: list[str]
  unused: list[str]

  def summary(self, path: str) -> str:
    return (f'init_from {path}: loaded {len(self.loaded)} variables '
            f'({_summarize(self.loaded)}); newly initialised {len(self.initialised)} '
            f'({_summarize(self.initialised)}); unused from the checkpoint '
            f'{len(self.unused)} ({_summarize(self.unused)})')


def _summarize(names: list[str], limit: int = 8) -> str:
  """Names grouped by their two leading path components, with counts."""
  if not names:
    return 'none'
  groups: dict[str, int] = {}
  for name in names:
    key = '/'.join(name.split('/')[:3])
    groups[key] = groups.get(key, 0) + 1
  items = [f'{k}/* x{n}' if n > 1 else k for k, n in groups.items()]
  more = f', ... {len(items) - limit} more' if len(items) > limit else ''
  return ', '.join(items[:limit]) + more


def _flat(tree) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/') if tree else {}


def merge_variables(model_variables: dict[str, Any], loaded: dict[str, Any],
                    subtrees=()) -> tuple[dict[str, Any], Report]:
  """Model variables with the selected `loaded` subtrees put in; (variables, report).

  Args:
    model_variables: {'params': ..., 'batch_stats': ...} of the fresh model.
    loaded: the same structure from a checkpoint.
    subtrees: see the module docstring; () = everything in `loaded`.
  Raises:
    ValueError: a selected checkpoint path that matches nothing, a loaded variable
      the model does not have, or one whose shape differs (naming both shapes).
  """
  pairs = parse_subtrees(tuple(subtrees))
  model_flat = {c: _flat(t) for c, t in model_variables.items()}
  loaded_flat = {c: _flat(t) for c, t in loaded.items()}
  merged = {c: dict(f) for c, f in model_flat.items()}
  used, assigned = set(), set()
  for src, dst in (pairs or [('', '')]):
    matched = 0
    for collection, flat in sorted(loaded_flat.items(), key=lambda item: item[0] != 'params'):
      for path, value in flat.items():
        if src and path != src and not path.startswith(src + '/'):
          continue
        matched += 1
        target = dst + path[len(src):] if src else path
        name = f'{collection}/{target}'
        if collection not in model_flat or target not in model_flat[collection]:
          raise ValueError(f'init_from: checkpoint {collection} {path!r} has no counterpart '
                           f'{target!r} in the model; model variables under it: '
                           f'{_near(model_flat.get(collection, {}), target)}')
        want = tuple(np.shape(model_flat[collection][target]))
        if tuple(np.shape(value)) != want:
          raise ValueError(f'init_from: shape mismatch for {collection} {target!r}: checkpoint '
                           f'{tuple(np.shape(value))} vs model {want}')
        merged[collection][target] = jnp.asarray(value, model_flat[collection][target].dtype)
        used.add(f'{collection}/{path}')
        assigned.add(name)
    if not matched:
      tops = sorted({p.split('/')[0] for f in loaded_flat.values() for p in f})
      raise ValueError(f'init_from: subtree {src!r} is not in the checkpoint; its top-level '
                       f'entries are {tops}')
  report = Report(
      loaded=sorted(assigned),
      initialised=sorted(f'{c}/{p}' for c, f in model_flat.items() for p in f
                         if f'{c}/{p}' not in assigned),
      unused=sorted(f'{c}/{p}' for c, f in loaded_flat.items() for p in f
                    if f'{c}/{p}' not in used))
  out = {c: flax.traverse_util.unflatten_dict(f, sep='/') if f else {}
         for c, f in merged.items()}
  return out, report


def _near(flat: dict[str, Any], target: str) -> str:
  parent = target.rsplit('/', 1)[0]
  names = sorted(p for p in flat if p.startswith(parent + '/'))
  return str(names[:6]) if names else 'none'


def load(init_config: ml_collections.ConfigDict,
         model_variables: dict[str, Any]) -> tuple[dict[str, Any], Report]:
  """Reads `init_config.path` and merges it into `model_variables` (see merge_variables)."""
  path = init_config.path
  if not os.path.exists(path):
    raise FileNotFoundError(f'config.init_from.path={path!r} does not exist; convert weights '
                            'with `python -m segjax.convert --from=torchvision --arch=... '
                            '--input=... --output=DIR` and pass DIR')
  loaded, metadata = checkpoint.load_variables(path)
  variables, report = merge_variables(model_variables, loaded, tuple(init_config.subtrees))
  logging.info('%s [checkpoint: %s %s]', report.summary(path), metadata.get('source', '?'),
               metadata.get('arch', '?'))
  return variables, report


def apply_to_state(state, init_config: ml_collections.ConfigDict):
  """The TrainState with init_from's variables (optimizer state re-initialised); the
  state itself when `init_config.path` is ''."""
  if not init_config.path:
    return state
  variables, _ = load(init_config, {'params': state.params, 'batch_stats': state.batch_stats})
  params = variables['params']
  return state.replace(params=params, batch_stats=variables.get('batch_stats', {}),
                       opt_state=state.tx.init(params))
