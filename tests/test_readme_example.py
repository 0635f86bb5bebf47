"""README's "Use segjax modules in your own JAX project" example runs verbatim and gives
the hand-computed numbers; the library packages' `__all__` names exist, are documented,
and their functions are typed."""

import contextlib
import importlib
import inspect
import io
import os
import re

import numpy as np
import pytest

_README = os.path.join(os.path.dirname(__file__), '..', 'README.md')
_MARKER = '<!-- tests/test_readme_example.py runs the next code block verbatim -->'


def _example() -> str:
  with open(_README, encoding='utf-8') as f:
    text = f.read()
  assert text.count(_MARKER) == 1
  match = re.search(re.escape(_MARKER) + r'\s*```python\n(.*?)```', text, re.DOTALL)
  assert match, 'no python code block after the marker'
  return match.group(1)


def test_readme_example_runs_verbatim_with_hand_computed_values():
  code = _example()
  assert 10 <= len(code.strip().splitlines()) <= 14
  namespace, stdout = {}, io.StringIO()
  with contextlib.redirect_stdout(stdout):
    exec(compile(code, 'README.md example', 'exec'), namespace)  # pylint: disable=exec-used
  # IoU of boxes 0 and 1: intersection 4 x 3 = 12 over union 16 + 12 - 12 = 16.
  assert float(namespace['iou'][0, 1]) == pytest.approx(0.75)
  assert float(namespace['iou'][0, 2]) == 0.0   # they touch at a corner only
  # Box 1 overlaps box 0 (IoU 0.75 > 0.5) with a lower score: suppressed.
  np.testing.assert_array_equal(namespace['kept'].indices, [0, 2, -1])
  np.testing.assert_array_equal(namespace['kept'].valid, [True, True, False])
  # RoIAlign of the ramp f(y, x) = x, 2 x 2 bins, 2 x 2 samples, aligned (-0.5 px):
  # box [0, 4] samples x = 0, 1 | 2, 3 -> bin means 0.5 | 2.5; box [4, 8]: 4.5 | 6.5.
  feats = np.asarray(namespace['feats'])
  assert feats.shape == (1, 2, 2, 2, 1)
  np.testing.assert_allclose(feats[0, :, :, :, 0],
                             [[[0.5, 2.5], [0.5, 2.5]], [[4.5, 6.5], [4.5, 6.5]]], atol=1e-6)
  printed = stdout.getvalue().split()
  assert printed[0] == '0.75'


_PACKAGES = ('segjax.models', 'segjax.models.detection', 'segjax.evaluation')


@pytest.mark.parametrize('package', _PACKAGES)
def test_public_names_exist_are_documented_and_typed(package):
  module = importlib.import_module(package)
  assert module.__doc__ and len(module.__all__) == len(set(module.__all__))
  namespace = {}
  exec(f'from {package} import *', namespace)  # pylint: disable=exec-used
  assert set(module.__all__) <= set(namespace)
  for name in module.__all__:
    value = namespace[name]  # a submodule (crf) is imported by the star import
    if isinstance(value, dict) or not callable(value) and not inspect.ismodule(value):
      continue  # registries and constants
    assert inspect.getdoc(value), f'{package}.{name} has no docstring'
    if inspect.isfunction(value) or (callable(value) and hasattr(value, '__wrapped__')):
      fn = inspect.unwrap(value)
      signature = inspect.signature(fn)
      untyped = [p for p in signature.parameters.values()
                 if p.annotation is inspect.Parameter.empty and p.name not in ('self', 'cls')]
      assert not untyped, f'{package}.{name}: untyped parameters {[p.name for p in untyped]}'
      assert signature.return_annotation is not inspect.Signature.empty, (
          f'{package}.{name} has no return annotation')


def test_detection_modules_keep_their_names():
  # The package exports functions next to modules of the same name; the module wins.
  from segjax.models import detection  # pylint: disable=g-import-not-at-top
  for name in ('nms', 'roi_align', 'roi_pool', 'multiscale_roi_align', 'boxes'):
    assert inspect.ismodule(getattr(detection, name)), name
  assert detection.nms.nms.__module__ == 'segjax.models.detection.nms'
