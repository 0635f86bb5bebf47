"""segjax.visualize (palette, overlays, panels, confusion matrix), TensorBoard images of
MetricWriter.write_images read back from the event file, and the trainers' eval-image hooks."""

import importlib.util
import io
import os
import struct

import flax
import jax
import numpy as np
import pytest
from PIL import Image

from segjax import visualize
from segjax.data import pipeline
from segjax.evaluation import coco_eval
from segjax.train import detection_trainer, loop, metric_writer, trainer


def read_tensorboard_images(logdir):
  """{(tag, step): PIL image} of every image summary in the event files of `logdir`
  (TFRecord framing: u64 length, u32 crc, Event proto, u32 crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  images = {}
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        if value.HasField('image'):
          images[(value.tag, event.step)] = Image.open(io.BytesIO(
              value.image.encoded_image_string))
  return images


def test_voc_palette_matches_the_devkit_colours():
  palette = visualize.voc_palette()
  assert palette.shape == (256, 3) and palette.dtype == np.uint8
  # VOC: background, aeroplane, bicycle, bird, ..., person (15), void (255).
  expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
              8: (64, 0, 0), 15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}
  for index, colour in expected.items():
    assert tuple(palette[index]) == colour, index
  assert len({tuple(c) for c in palette}) == 256


def test_label_image_is_a_palette_png_that_round_trips(tmp_path):
  label = np.arange(12, dtype=np.int32).reshape(3, 4) % 11
  label[0, 0] = 255
  path = tmp_path / 'l.png'
  visualize.label_image(label).save(path)
  loaded = Image.open(path)
  assert loaded.mode == 'P' and loaded.size == (4, 3)
  np.testing.assert_array_equal(np.asarray(loaded), label)
  assert tuple(np.asarray(loaded.convert('RGB'))[0, 1]) == (128, 0, 0)  # class 1
  with pytest.raises(ValueError, match='0..255'):
    visualize.label_image(np.full((2, 2), 256))


def test_overlay_blends_only_object_pixels():
  image = np.full((2, 3, 3), 100, np.uint8)
  label = np.asarray([[0, 1, 255], [2, 0, 1]])
  out = visualize.overlay(image, label, alpha=0.5)
  np.testing.assert_array_equal(out[0, 0], [100, 100, 100])  # background
  np.testing.assert_array_equal(out[0, 2], [100, 100, 100])  # ignore label
  np.testing.assert_array_equal(out[0, 1], [114, 50, 50])  # (100 + 128) / 2, 100 / 2
  np.testing.assert_array_equal(out[1, 0], [50, 114, 50])
  with pytest.raises(ValueError, match='does not match'):
    visualize.overlay(image, label[:1])


def test_draw_instances_tints_masks_and_outlines_boxes():
  image = np.full((40, 50, 3), 200, np.uint8)
  mask = np.zeros((1, 40, 50), bool)
  mask[0, 20:30, 10:20] = True
  out = visualize.draw_instances(image, [[10, 20, 20, 30]], [2], [0.9], mask, ['bg', 'a', 'b'],
                                 alpha=0.5)
  green = tuple(visualize.voc_palette()[2])
  assert tuple(out[25, 19]) == green  # right edge of the box: the outline
  np.testing.assert_array_equal(out[25, 15], [100, 164, 100])  # (200 + 0|128) / 2 inside
  np.testing.assert_array_equal(out[5, 45], [200, 200, 200])  # far from the instance
  assert (out[8:20, 10:30] == green).all(axis=-1).any()  # the caption box above
  empty = visualize.draw_instances(image, np.zeros((0, 4)), [], [], np.zeros((0, 40, 50)))
  np.testing.assert_array_equal(empty, image)


def test_semantic_panel_puts_image_ground_truth_and_prediction_side_by_side():
  image = np.zeros((64, 64, 3), np.uint8)
  label, prediction = np.ones((64, 64), int), np.full((64, 64), 2)
  panel = visualize.semantic_panel(image, label, prediction, min_side=128)
  assert panel.shape == (128, 3 * 128 + 2 * 4, 3)
  assert tuple(panel[0, 0]) == (0, 0, 0)
  assert tuple(panel[0, 132]) == (128, 0, 0) and tuple(panel[127, -1]) == (0, 128, 0)
  grid = visualize.panel_grid([panel, panel], ('image', 'ground truth', 'prediction'))
  assert grid.shape[0] > 2 * 128 + 4 and grid.shape[1] == panel.shape[1]


def test_confusion_matrix_image_shades_rows_by_recall():
  confusion = np.asarray([[90, 10, 0], [0, 0, 0], [5, 0, 15]])
  picture = visualize.confusion_matrix_image(confusion, ['bg', 'one', 'two'], cell=30)
  height, width = picture.shape[:2]
  # The grid is in the bottom-right corner: cell (i, j) spans [h-2-30(3-i), ...).
  def corner(i, j):
    return picture[height - 2 - 30 * (3 - i) + 2, width - 2 - 30 * (3 - j) + 2]
  dark, white, grey = corner(0, 0), corner(0, 2), corner(1, 1)
  np.testing.assert_array_equal(white, [255, 255, 255])
  np.testing.assert_array_equal(grey, [200, 200, 200])  # no ground truth of class 1
  assert dark.sum() < corner(2, 2).sum() < corner(0, 1).sum() < 765  # 0.9 < 0.75 < 0.1
  with pytest.raises(ValueError, match='square'):
    visualize.confusion_matrix_image(np.zeros((2, 3)))


def test_write_images_reaches_the_event_file(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path))
  picture = np.zeros((5, 7, 3), np.uint8)
  picture[1, 2] = (10, 200, 30)
  writer.write_images(3, {'eval/x': picture})
  with pytest.raises(ValueError, match='eval/bad'):
    writer.write_images(3, {'eval/bad': np.zeros((5, 7), np.float32)})
  writer.close()
  images = read_tensorboard_images(str(tmp_path / 'tensorboard'))
  np.testing.assert_array_equal(np.asarray(images[('eval/x', 3)].convert('RGB')), picture)


def _tiny_semantic_config(data_dir):
  path = os.path.join(os.path.dirname(__file__), '..', 'configs', 'fcn8s.py')
  spec = importlib.util.spec_from_file_location('fcn8s_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.dataset.name, c.dataset.data_dir = 'digit_scenes/tiny', data_dir
  c.model.width_multiplier = 0.125
  c.dataset.crop_size = (32, 32)
  c.eval_batch_size = 4
  c.eval.num_images = 3
  c.eval.tta.scales = (1.0,)  # the drawn prediction is the plain model's argmax
  return c


def random_scores(state, seed=0):
  """`state` with the zero-initialised FCN score layers (FCN §4.1) made random, so the
  argmax varies over pixels and classes."""
  flat = flax.traverse_util.flatten_dict(state.params)
  rng = np.random.default_rng(seed)
  flat = {k: (rng.normal(size=v.shape).astype(np.float32) if k[0].startswith('score') and
              k[-1] == 'kernel' else v) for k, v in flat.items()}
  return state.replace(params=flax.traverse_util.unflatten_dict(flat))


def test_semantic_eval_hook_writes_examples_and_confusion_matrix(tmp_path, data_dir):
  config = _tiny_semantic_config(data_dir)
  state = random_scores(trainer.create_state(config))
  driver = trainer.make_driver(config)
  eval_loader = pipeline.create_eval_loader(config.dataset, global_batch_size=4)
  device_state = driver.put_state(state)
  evaluate = trainer.make_evaluate(config, driver, eval_loader, None)
  writer = metric_writer.MetricWriter(str(tmp_path))
  metrics = loop._evaluate(evaluate, device_state, 7, writer)  # pylint: disable=protected-access
  writer.close()
  assert metrics == trainer.evaluate(driver, device_state, eval_loader)

  images = read_tensorboard_images(str(tmp_path / 'tensorboard'))
  assert set(images) == {('eval/examples', 7), ('eval/confusion_matrix', 7)}
  examples = np.asarray(images[('eval/examples', 7)].convert('RGB'))
  # 3 rows of 64x64 scenes enlarged x2, image | ground truth | prediction.
  assert examples.shape[1] == 3 * 128 + 2 * 4
  batch = next(iter(eval_loader))
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          batch['image'][2:3], train=False)['logits']
  prediction = np.asarray(jax.numpy.argmax(logits[0], -1))
  assert len(np.unique(prediction)) > 1
  expected = visualize.upscale(visualize.colorize(prediction), 128)
  np.testing.assert_array_equal(examples[-128:, -128:], expected)  # last row, prediction
  np.testing.assert_array_equal(examples[-128:, 132:260],
                                visualize.upscale(visualize.colorize(batch['label'][2]), 128))
  assert images[('eval/confusion_matrix', 7)].size[0] > 11 * 28

  config.eval.num_images = 0
  assert isinstance(trainer.make_evaluate(config, driver, eval_loader, None)(device_state), dict)


def test_detection_example_panels_draw_ground_truth_and_detections():
  mask = np.zeros((1, 2, 64, 64), np.uint8)
  mask[0, 0, 10:30, 5:25] = 1
  batch = {'image': np.zeros((1, 64, 64, 3), np.float32), 'image_size': np.asarray([[64, 48]]),
           'image_id': np.asarray([5]), 'gt_valid': np.asarray([[True, False]]),
           'gt_boxes': np.asarray([[[5, 10, 25, 30], [0, 0, 0, 0]]], np.float32),
           'gt_labels': np.asarray([[3, 0]]), 'gt_masks': mask}
  outputs = {'boxes': np.asarray([[[6, 11, 26, 31], [1, 1, 9, 9]]], np.float32),
             'scores': np.asarray([[0.9, 0.2]]), 'labels': np.asarray([[3, 4]]),
             'valid': np.asarray([[True, True]])}
  grid = detection_trainer.example_panels(outputs, batch, 4, mean=(100.0,) * 3, std=(1.0,) * 3)
  factor = 192 // 48  # the 64x48 input enlarged to a short side of 192
  assert grid.shape[1] == 3 * 48 * factor + 2 * 4
  colour = visualize.voc_palette()[3]
  detections = grid[-64 * factor:, -48 * factor:]
  # Score 0.9 drawn (right edge x2 = 26 -> column 26*4 - 1), score 0.2 below the threshold not.
  assert (detections[11 * factor + 40:31 * factor - 1, 26 * factor - 1] == colour).all()
  assert not (detections[:9 * factor, :9 * factor] == visualize.voc_palette()[4]).all(-1).any()
  background = grid[-64 * factor:, :48 * factor]
  assert (background == 100).all()  # the un-normalised image: 0 * 1 + 100


def test_instances_from_coco_decodes_rle_masks():
  masks = np.zeros((2, 6, 7), np.uint8)
  masks[0, 1:3, 2:5] = 1
  masks[1, 4:, :] = 1
  results = [{'image_id': 1, 'category_id': c, 'bbox': [1.0, 2.0, 3.0, 4.0], 'score': s,
              'segmentation': rle}
             for c, s, rle in zip((2, 7), (0.5, 0.25), coco_eval.encode_masks(masks))]
  instances = detection_trainer.instances_from_coco(results, (6, 7))
  np.testing.assert_array_equal(instances['masks'], masks)
  np.testing.assert_array_equal(instances['boxes'], [[1, 2, 4, 6]] * 2)
  np.testing.assert_array_equal(instances['labels'], [2, 7])
  assert detection_trainer.instances_from_coco([], (6, 7))['masks'].shape == (0, 6, 7)
