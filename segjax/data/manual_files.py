"""Reading a user's downloaded dataset files for segjax's TFDS builders (VOC, COCO, Cityscapes).

What the builders share: checks that the expected files and folders exist (a missing
one is a `ManualFilesError` naming the path and what should be there), decoding an
image to check it before it is written, PNG encoding of label maps and masks, the
bad-example policy, and an ordered thread-pool map that overlaps file decoding.

Bad-example policy. A per-example problem (an image that does not decode, a mask
whose size differs from its image, a label value outside the dataset's classes) raises
`BadExampleError` naming the file and what was expected. By default the build stops
with that error. A builder made with `skip_bad_examples=True` (build flag
`--skip_bad_examples`) instead logs a warning per skipped example, counts it, and
records the skipped file names in the dataset info (`info.metadata['skipped']`).
Layout problems (a missing folder, split list or annotation file) always stop the
build: skipping them would silently build a different dataset.

Images are stored as their original encoded bytes when Pillow decodes them to RGB;
any other mode (grayscale or CMYK JPEGs, RGBA PNGs) is converted to RGB and stored as
PNG, because the TFDS decoder returns the file's own channel count.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

_T = TypeVar('_T')
_R = TypeVar('_R')


class ManualFilesError(FileNotFoundError):
  """The downloaded files are not laid out as the builder expects."""


class BadExampleError(ValueError):
  """One example's files are unusable; the message names the file and the expectation."""


def require_dir(path: str, what: str) -> str:
  """`path` if it is a directory, else ManualFilesError naming it and `what` belongs there."""
  if not os.path.isdir(path):
    raise ManualFilesError(f'Expected {what} at {path}: no such directory.')
  return path


def require_file(path: str, what: str) -> str:
  """`path` if it is a file, else ManualFilesError naming it and `what` belongs there."""
  if not os.path.isfile(path):
    raise ManualFilesError(f'Expected {what} at {path}: no such file.')
  return path


def read_split_list(path: str, what: str) -> list[str]:
  """Non-empty stripped lines of an ImageSets-style list file (one image name a line)."""
  require_file(path, what)
  with open(path) as f:
    names = [line.split()[0] for line in f if line.strip()]
  if not names:
    raise ManualFilesError(f'{what} at {path} lists no images.')
  return names


def read_rgb_image(path: str) -> tuple[bytes, int, int]:
  """-> (encoded bytes to store, height, width) of an image file, fully decoded once.

  Raises BadExampleError naming `path` if the file is missing or does not decode.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.mode == 'RGB':
        return data, image.height, image.width
      rgb = image.convert('RGB')
  except (OSError, ValueError, SyntaxError) as error:
    raise BadExampleError(
        f'{path}: cannot read it as an image ({error}); expected a JPEG or PNG file.'
    ) from None
  return encode_png(np.asarray(rgb)), rgb.height, rgb.width


def read_png_indices(path: str, what: str, palette: bool) -> np.ndarray:
  """Pixel values of a single-channel label PNG -> uint8 [H, W].

  palette: require a palette-mode ('P') PNG, whose indices are the labels (VOC); else
  an 8-bit grey ('L') PNG (Cityscapes labelIds). Raises BadExampleError naming `path`.
  """
  expected = 'P' if palette else 'L'
  try:
    with Image.open(path) as image:
      image.load()
      mode = image.mode
      values = np.asarray(image)
  except (OSError, ValueError, SyntaxError) as error:
    raise BadExampleError(f'{path}: cannot read {what} ({error}); expected a PNG file.') from None
  if mode != expected:
    raise BadExampleError(
        f'{path}: {what} has PIL mode {mode!r}; expected a {"palette" if palette else "grey"} '
        f'PNG (mode {expected!r}) whose pixel values are the labels.')
  return values.astype(np.uint8, copy=False)


def check_same_size(path: str, shape: tuple[int, ...], image_path: str,
                    image_hw: tuple[int, int]) -> None:
  """BadExampleError unless a label map of `shape` [H, W] matches its image's (H, W)."""
  if tuple(shape[:2]) != tuple(image_hw):
    raise BadExampleError(
        f'{path}: label size {shape[0]}x{shape[1]} (HxW) differs from its image {image_path} '
        f'({image_hw[0]}x{image_hw[1]}); expected the same size.')


def check_values(path: str, values: np.ndarray, allowed: Iterable[int], what: str) -> None:
  """BadExampleError naming the unexpected values of a label map at `path`."""
  allowed = np.asarray(sorted(set(allowed)))
  present = np.unique(values)
  unknown = present[~np.isin(present, allowed)]
  if unknown.size:
    raise BadExampleError(
        f'{path}: unknown {what} {unknown.tolist()}; expected values in '
        f'{_ranges(allowed.tolist())}.')


def _ranges(values: list[int]) -> str:
  """[0, 1, 2, 3, 255] -> '0-3, 255'."""
  parts, start = [], None
  for i, v in enumerate(values):
    if start is None:
      start = v
    if i + 1 == len(values) or values[i + 1] != v + 1:
      parts.append(str(start) if start == v else f'{start}-{v}')
      start = None
  return ', '.join(parts)


def encode_png(array: np.ndarray) -> bytes:
  """uint8 [H, W] or [H, W, 3] -> PNG bytes (lossless; TFDS stores them as they are)."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array, np.uint8)).save(buffer, format='PNG')
  return buffer.getvalue()


def mask_bbox(mask: np.ndarray) -> tuple[float, float, float, float] | None:
  """Normalised (ymin, xmin, ymax, xmax) of a [H, W] mask, max edges exclusive; None if empty."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  if rows.size == 0:
    return None
  h, w = mask.shape
  return rows[0] / h, cols[0] / w, (rows[-1] + 1) / h, (cols[-1] + 1) / w


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], num_threads: int,
                window: int = 64) -> Iterator[_R]:
  """`map(fn, items)` on a thread pool, in order, at most `window` items in flight.

  Decoding and PNG encoding release the GIL, so threads overlap them.
  """
  if num_threads <= 1:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= window:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


class BadExamplePolicy:
  """Raise (default) or log, count and record every BadExampleError of a build."""

  def __init__(self, skip: bool):
    self.skip = bool(skip)
    self.skipped: dict[str, list[str]] = {}

  def guard(self, split: str, fn: Callable[[_T], _R]) -> Callable[[_T], _R | None]:
    """`fn` returning None instead of raising BadExampleError when skipping."""

    def guarded(item: _T) -> _R | None:
      try:
        return fn(item)
      except BadExampleError as error:
        if not self.skip:
          raise
        logging.warning('Skipping a bad %s example: %s', split, error)
        self.skipped.setdefault(split, []).append(str(error))
        return None

    return guarded

  def report(self, split: str, num_written: int) -> None:
    n = len(self.skipped.get(split, []))
    if n:
      logging.warning('%s: skipped %d bad examples, wrote %d (--skip_bad_examples).', split, n,
                      num_written)


class ManualBuilder(tfds.core.GeneratorBasedBuilder):
  """A TFDS builder over files the user downloaded (`manual_dir`), with the bad-example
  policy above and a thread pool for decoding. Abstract: not registered with TFDS.

  Subclasses set `code_path = epath.Path(__file__)` (TFDS 4.9.10 cannot derive it on a
  clean install, see `digit_scenes`), return `{split: self._generate_examples(split,
  items)}` from `_split_generators`, and define `_load(item) -> (key, example)`.
  """

  def __init__(self, *, skip_bad_examples: bool = False, num_threads: int = 4, **kwargs):
    self._policy = BadExamplePolicy(skip_bad_examples)
    self._num_threads = int(num_threads)
    super().__init__(**kwargs)

  def _manual_root(self, dl_manager) -> str:
    """The --manual_dir, or ManualFilesError saying it is missing."""
    try:
      root = os.fspath(dl_manager.manual_dir)
    except AssertionError:
      root = None
    if not root or not os.path.isdir(root):
      raise ManualFilesError(
          f'{self.name}: the manual_dir with the downloaded files is missing ({root}). '
          f'Expected: {self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}')
    return root

  def _load(self, item) -> tuple[str, dict]:
    """One example's (key, feature dict) from its files; BadExampleError if unusable."""
    raise NotImplementedError

  def _generate_examples(self, split: str, items: Iterable) -> Iterator[tuple[str, dict]]:
    """(key, example) of `self._load(item)` for each item, bad ones handled by the policy."""
    written = 0
    for result in ordered_map(self._policy.guard(split, self._load), items, self._num_threads):
      if result is not None:
        written += 1
        yield result
    self._policy.report(split, written)
    skipped = {k: list(v) for k, v in self._policy.skipped.items()}
    self.info.metadata['skipped'] = skipped
