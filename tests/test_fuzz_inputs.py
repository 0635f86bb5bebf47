"""Property tests over the input pipelines' per-example transforms and the box ops: random
shapes, dtypes and values give either a correct result or the documented ValueError,
never another exception."""

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np

from segjax.data import instance_pipeline, transforms
from segjax.models.detection import boxes as box_ops

NUM_CLASSES = 5
CROP = (16, 16)
_DTYPES = (np.uint8, np.uint16, np.float32, np.int64)


@st.composite
def semantic_records(draw):
  h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
  channels = draw(st.sampled_from((1, 2, 3, 4)))
  shape = (h, w) if channels == 1 and draw(st.booleans()) else (h, w, channels)
  dtype = draw(st.sampled_from(_DTYPES))
  seed = draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, shape).astype(dtype)
  lh = h + draw(st.sampled_from((0, 0, 0, 1)))
  values = draw(st.lists(st.sampled_from((-1, 0, 1, 4, 5, 7, 255)), min_size=1, max_size=3))
  label = rng.choice(values, size=(lh, w, 1)).astype(np.int64)
  return {'image': image, 'segmentation': label}


def _semantic_ok(record) -> bool:
  image, label = record['image'], record['segmentation']
  valid_values = np.isin(label, list(range(NUM_CLASSES)) + [255]).all()
  return (image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8
          and label.shape[:2] == image.shape[:2] and bool(valid_values))


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(semantic_records(), st.integers(0, 2**16))
def test_semantic_train_transforms_give_a_valid_crop_or_a_value_error(record, seed):
  ops = [transforms.DecodeExample('image', 'segmentation', num_classes=NUM_CLASSES),
         transforms.RandomScale((0.5, 2.0)), transforms.RandomCrop(CROP, (1.0, 2.0, 3.0)),
         transforms.RandomHorizontalFlip(0.5), transforms.Normalize((0, 0, 0), (1, 1, 1))]
  rng = np.random.default_rng(seed)
  element = dict(record)
  try:
    for op in ops:
      element = op.random_map(element, rng) if hasattr(op, 'random_map') else op.map(element)
  except ValueError as error:
    assert not _semantic_ok(record), error
    return
  assert _semantic_ok(record)
  assert element['image'].shape == CROP + (3,) and element['image'].dtype == np.float32
  assert element['label'].shape == CROP and element['label'].dtype == np.int32
  assert np.isfinite(element['image']).all()
  assert np.isin(element['label'], list(range(NUM_CLASSES)) + [255]).all()
  # Crop padding (bottom/right beyond a small image) is the ignore label, never a class.
  h, w = record['segmentation'].shape[:2]
  if h * 2 < CROP[0]:  # even the largest scale leaves rows of padding
    assert (element['label'][-1] == 255).all()


@st.composite
def instance_records(draw):
  h, w = draw(st.integers(1, 32)), draw(st.integers(1, 32))
  n = draw(st.integers(0, 4))
  floats = st.floats(-0.5, 1.5, allow_nan=False, width=32)
  # tfds bbox: normalised (ymin, xmin, ymax, xmax); degenerate and inverted boxes included.
  bbox = np.asarray(draw(st.lists(st.tuples(floats, floats, floats, floats), min_size=n,
                                  max_size=n)), np.float32).reshape(n, 4)
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  return {'image': rng.integers(0, 256, (h, w, 3)).astype(np.uint8),
          'objects': {'bbox': bbox, 'label': rng.integers(0, 3, n),
                      'mask': [rng.integers(0, 2, (h, w, 1)).astype(np.uint8) for _ in range(n)],
                      'is_crowd': rng.integers(0, 2, n).astype(bool)},
          'image_id': 7}


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(instance_records(), st.integers(0, 2**16))
def test_instance_transforms_keep_only_proper_boxes_inside_the_padded_image(record, seed):
  ops = [instance_pipeline.DecodeInstances(), instance_pipeline.ResizeInstances(24, 40),
         instance_pipeline.RandomHorizontalFlipInstances(0.5),
         instance_pipeline.PadInstances((40, 40), max_instances=3, pad_value=(0, 0, 0))]
  rng = np.random.default_rng(seed)
  element = record
  for op in ops:
    element = op.random_map(element, rng) if hasattr(op, 'random_map') else op.map(element)
  h0, w0 = record['image'].shape[:2]
  bbox = np.clip(record['objects']['bbox'], 0, 1) * np.asarray([h0, w0, h0, w0], np.float32)
  min_size = instance_pipeline.MIN_BOX_SIZE
  proper = ((bbox[:, 3] - bbox[:, 1] >= min_size) & (bbox[:, 2] - bbox[:, 0] >= min_size)
            & ~record['objects']['is_crowd'])
  valid = element['gt_valid']
  assert valid.sum() == min(int(proper.sum()), 3)  # zero instances -> no valid slot
  kept = element['gt_boxes'][valid]
  assert (kept[:, 2] > kept[:, 0]).all() and (kept[:, 3] > kept[:, 1]).all()
  assert (element['gt_labels'][valid] >= 1).all() and (element['gt_labels'][~valid] == 0).all()
  h, w = element['image_size']
  assert 1 <= h <= 40 and 1 <= w <= 40
  assert (kept >= 0).all() and (kept[:, [0, 2]] <= w).all() and (kept[:, [1, 3]] <= h).all()
  assert not element['gt_masks'][:, h:].any() and not element['gt_masks'][:, :, w:].any()


_coords = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(st.lists(st.tuples(_coords, _coords, _coords, _coords), min_size=1,
                           max_size=6),
                  st.integers(1, 2000), st.integers(1, 2000))
def test_box_clip_and_area_are_bounded_for_any_boxes(boxes, height, width):
  b = jnp.asarray(boxes, jnp.float32)
  clipped = np.asarray(box_ops.clip_boxes_to_image(b, (height, width)))
  assert np.isfinite(clipped).all()
  assert (clipped[:, [0, 2]] >= 0).all() and (clipped[:, [0, 2]] <= width).all()
  assert (clipped[:, [1, 3]] >= 0).all() and (clipped[:, [1, 3]] <= height).all()
  iou = np.asarray(box_ops.box_iou(jnp.asarray(clipped), jnp.asarray(clipped)))
  assert np.isfinite(iou).all() and (iou >= 0).all() and (iou <= 1 + 1e-6).all()
  proper = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
  np.testing.assert_allclose(np.diag(iou)[proper], 1.0, rtol=1e-5)
