"""Pictures of segmentations: palette, label images, overlays, panels, confusion matrices.

Pure numpy + Pillow (no matplotlib), host-side, used by `segjax.predict` and by the
trainers' evaluation (TensorBoard images via `metric_writer.MetricWriter.write_images`).

    palette = voc_palette()                            # uint8 [256, 3], PASCAL VOC colours
    label_image(label).save('x.png')                   # palette-mode ('P') PNG of a label map
    overlay(image, label)                              # uint8 [H, W, 3]: classes tinted on the image
    draw_instances(image, boxes, labels, scores, masks, class_names)
    semantic_panel(image, label, prediction)           # image | ground truth | prediction
    confusion_matrix_image(confusion, class_names)     # row-normalised heat map

Images are uint8 RGB [H, W, 3]; label maps int [H, W] with class indices (0 =
background; `ignore_label`, 255 in VOC, keeps its palette colour in label images and
is left untinted in overlays). Boxes are [N, 4] (x1, y1, x2, y2) in pixels, the
detectors' convention.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Separates the columns of a panel and frames the confusion matrix.
_GAP_COLOUR = (255, 255, 255)
_TEXT_COLOUR = (0, 0, 0)


def voc_palette(num_colours: int = 256) -> np.ndarray:
  """uint8 [num_colours, 3]: the PASCAL VOC colour map (0 black, 1 maroon, ..., 255 cream).

  Colour i spreads the bits of i over the channels, most significant first: bit 3k of
  i goes to bit 7-k of red, bit 3k+1 to green, bit 3k+2 to blue (the VOC devkit's
  `labelcolormap`).
  """
  index = np.arange(num_colours)
  palette = np.zeros((num_colours, 3), np.int64)
  for k in range(8):
    for channel in range(3):
      palette[:, channel] |= ((index >> (3 * k + channel)) & 1) << (7 - k)
  return palette.astype(np.uint8)


def label_image(label: np.ndarray, palette: np.ndarray | None = None) -> Image.Image:
  """Palette-mode ('P') PIL image of `label` (int [H, W], values 0..255).

  Raises ValueError for values outside 0..255 (a PNG palette holds 256 colours).
  """
  label = np.asarray(label)
  if label.ndim != 2:
    raise ValueError(f'label must be [H, W], got shape {label.shape}')
  if label.size and (label.min() < 0 or label.max() > 255):
    raise ValueError(f'label values must be in 0..255 for a palette PNG, got '
                     f'{label.min()}..{label.max()}')
  palette = voc_palette() if palette is None else np.asarray(palette, np.uint8)
  image = Image.fromarray(label.astype(np.uint8), mode='P')
  image.putpalette(palette.reshape(-1).tolist())
  return image


def colorize(label: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
  """int [H, W] labels -> uint8 [H, W, 3] colours (values taken modulo the palette size)."""
  palette = voc_palette() if palette is None else np.asarray(palette, np.uint8)
  return palette[np.asarray(label, np.int64) % len(palette)]


def overlay(image: np.ndarray, label: np.ndarray, *, alpha: float = 0.6,
            palette: np.ndarray | None = None, background: int = 0,
            ignore_label: int | None = 255) -> np.ndarray:
  """uint8 [H, W, 3]: `image` with every non-background pixel blended with its class colour.

  Pixels of class `background` or `ignore_label` keep the image's colour, so what the
  model found stands out on the picture it was found in.
  """
  image = _check_image(image)
  label = np.asarray(label)
  if label.shape != image.shape[:2]:
    raise ValueError(f'label shape {label.shape} does not match image shape {image.shape}')
  colours = colorize(label, palette).astype(np.float32)
  tint = label != background
  if ignore_label is not None:
    tint &= label != ignore_label
  out = image.astype(np.float32)
  out[tint] = (1 - alpha) * out[tint] + alpha * colours[tint]
  return np.round(out).astype(np.uint8)


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f'expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}')
  return image


def _font(size: int = 11) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size)
  except TypeError:  # Pillow < 10.1 has one bitmap size.
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  return right - left, bottom - top


def draw_instances(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                   scores: np.ndarray | None = None, masks: np.ndarray | None = None,
                   class_names: Sequence[str] | None = None, *, alpha: float = 0.5,
                   palette: np.ndarray | None = None, font_size: int = 11) -> np.ndarray:
  """uint8 [H, W, 3]: `image` with instance masks tinted, boxes outlined and captioned.

  Args:
    boxes: [N, 4] (x1, y1, x2, y2) pixels of `image`.
    labels: [N] class indices (the models' labels: 1.. for objects, 0 background);
      each instance is drawn in its class's palette colour.
    scores: optional [N]; the caption is 'name score'.
    masks: optional [N, H, W] binary masks.
    class_names: names indexed by label; default the label number.
  """
  out = _check_image(image).copy()
  palette = voc_palette() if palette is None else np.asarray(palette, np.uint8)
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  labels = np.asarray(labels, np.int64).reshape(-1)
  colours = palette[labels % len(palette)]
  if masks is not None:
    masks = np.asarray(masks).astype(bool)
    if masks.shape != (len(boxes),) + out.shape[:2]:
      raise ValueError(f'masks of shape {masks.shape} for {len(boxes)} boxes on an image of '
                       f'shape {out.shape}')
    blended = out.astype(np.float32)
    for mask, colour in zip(masks, colours):
      blended[mask] = (1 - alpha) * blended[mask] + alpha * colour
    out = np.round(blended).astype(np.uint8)
  canvas = Image.fromarray(out)
  draw = ImageDraw.Draw(canvas)
  font = _font(font_size)
  for i, (box, label, colour) in enumerate(zip(boxes, labels, colours)):
    colour = tuple(int(c) for c in colour)
    x1, y1, x2, y2 = (float(v) for v in box)
    draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour)
    name = (class_names[label] if class_names is not None and 0 <= label < len(class_names)
            else str(int(label)))
    caption = name if scores is None else f'{name} {float(scores[i]):.2f}'
    width, height = _text_size(draw, caption, font)
    top = y1 - height - 2 if y1 - height - 2 >= 0 else y1
    draw.rectangle((x1, top, x1 + width + 2, top + height + 2), fill=colour)
    text_colour = (0, 0, 0) if sum(colour) > 382 else (255, 255, 255)
    draw.text((x1 + 1, top), caption, fill=text_colour, font=font)
  return np.asarray(canvas)


def upscale(image: np.ndarray, min_side: int) -> np.ndarray:
  """Nearest-neighbour enlargement by the smallest integer factor reaching `min_side`."""
  factor = max(1, -(-min_side // max(1, min(image.shape[:2]))))
  return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def hstack(images: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
  """Images of one height side by side with `gap` white columns between them."""
  height = images[0].shape[0]
  spacer = np.full((height, gap, 3), _GAP_COLOUR, np.uint8)
  parts = []
  for i, image in enumerate(images):
    if image.shape[0] != height:
      raise ValueError(f'image {i} is {image.shape[0]} px high, the first {height}')
    parts += [spacer, image] if i else [image]
  return np.concatenate(parts, axis=1)


def vstack(images: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
  """Images stacked top to bottom, padded white on the right to the widest."""
  width = max(image.shape[1] for image in images)
  rows = []
  for i, image in enumerate(images):
    pad = np.full((image.shape[0], width - image.shape[1], 3), _GAP_COLOUR, np.uint8)
    if i:
      rows.append(np.full((gap, width, 3), _GAP_COLOUR, np.uint8))
    rows.append(np.concatenate([image, pad], axis=1))
  return np.concatenate(rows, axis=0)


def titled(image: np.ndarray, title: str, font_size: int = 11) -> np.ndarray:
  """`image` under a white strip holding `title`."""
  font = _font(font_size)
  probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  width, height = _text_size(probe, title, font)
  strip = Image.new('RGB', (max(image.shape[1], width + 4), height + 6), _GAP_COLOUR)
  ImageDraw.Draw(strip).text((2, 1), title, fill=_TEXT_COLOUR, font=font)
  return vstack([np.asarray(strip), image], gap=0)


def semantic_panel(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, *,
                   min_side: int = 128, palette: np.ndarray | None = None) -> np.ndarray:
  """image | ground truth | prediction (label colours), enlarged to at least `min_side`."""
  parts = [_check_image(image), colorize(label, palette), colorize(prediction, palette)]
  return hstack([upscale(p, min_side) for p in parts])


def instance_panel(image: np.ndarray, ground_truth: dict[str, np.ndarray],
                   prediction: dict[str, np.ndarray], class_names: Sequence[str] | None = None,
                   *, min_side: int = 192) -> np.ndarray:
  """image | ground truth | prediction, instances drawn by `draw_instances` after enlarging.

  `ground_truth` and `prediction` hold 'boxes' [N, 4] (x1, y1, x2, y2), 'labels' [N] and
  optionally 'masks' [N, H, W] and 'scores' [N], in the pixels of `image`. The image,
  masks and boxes are enlarged by an integer factor first so captions stay legible on
  small images.
  """
  image = _check_image(image)
  big = upscale(image, min_side)
  factor = big.shape[0] // image.shape[0]

  def drawn(instances):
    masks = instances.get('masks')
    if masks is not None:
      masks = np.repeat(np.repeat(np.asarray(masks), factor, axis=1), factor, axis=2)
    return draw_instances(big, np.asarray(instances['boxes'], np.float32) * factor,
                          instances['labels'], instances.get('scores'), masks, class_names)

  return hstack([big, drawn(ground_truth), drawn(prediction)])


def panel_grid(rows: Sequence[np.ndarray], headings: Sequence[str]) -> np.ndarray:
  """Panels stacked as rows under one line naming the columns ('image | ground truth | ...')."""
  return titled(vstack(rows), ' | '.join(headings))


def confusion_matrix_image(confusion: np.ndarray, class_names: Sequence[str] | None = None, *,
                           cell: int = 28, font_size: int = 10) -> np.ndarray:
  """uint8 RGB heat map of a [C, C] confusion matrix (rows: ground truth, columns: prediction).

  Each row is normalised by its ground-truth count (so the diagonal is each class's
  recall), white (0) to dark blue (1); cells show the percentage when C <= 30. Rows
  of classes absent from the ground truth stay grey.
  """
  confusion = np.asarray(confusion, np.float64)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f'confusion matrix must be square [C, C], got shape {confusion.shape}')
  num_classes = confusion.shape[0]
  names = [str(n) for n in (class_names if class_names is not None else range(num_classes))]
  if len(names) != num_classes:
    raise ValueError(f'{len(names)} class names for {num_classes} classes')
  totals = confusion.sum(axis=1, keepdims=True)
  with np.errstate(divide='ignore', invalid='ignore'):
    fraction = np.where(totals > 0, confusion / totals, np.nan)
  font = _font(font_size)
  probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  name_width = max(_text_size(probe, n, font)[0] for n in names) + 6
  title_height = _text_size(probe, 'Ag', font)[1] + 8
  left, top = name_width + title_height, name_width + 2 * title_height
  size = (left + num_classes * cell + 2, top + num_classes * cell + 2)
  canvas = Image.new('RGB', size, _GAP_COLOUR)
  draw = ImageDraw.Draw(canvas)
  draw.text((left, 2), 'columns: prediction', fill=_TEXT_COLOUR, font=font)
  rows_caption = Image.new('RGB', (num_classes * cell, title_height), _GAP_COLOUR)
  ImageDraw.Draw(rows_caption).text((2, 2), 'rows: ground truth', fill=_TEXT_COLOUR, font=font)
  canvas.paste(rows_caption.rotate(90, expand=True), (2, top))
  show_numbers = num_classes <= 30
  for i in range(num_classes):
    draw.text((title_height + 2, top + i * cell + (cell - font_size) // 2), names[i],
              fill=_TEXT_COLOUR, font=font)
    label = Image.new('RGB', (name_width, cell), _GAP_COLOUR)
    ImageDraw.Draw(label).text((2, (cell - font_size) // 2), names[i], fill=_TEXT_COLOUR,
                               font=font)
    canvas.paste(label.rotate(90, expand=True), (left + i * cell, title_height + 2))
    for j in range(num_classes):
      value = fraction[i, j]
      if np.isnan(value):
        colour = (200, 200, 200)
      else:
        # White -> (8, 48, 107), a dark blue: light cells for small fractions.
        colour = tuple(int(round(255 + (c - 255) * value)) for c in (8, 48, 107))
      x, y = left + j * cell, top + i * cell
      draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour, outline=(230, 230, 230))
      if show_numbers and not np.isnan(value) and value >= 0.005:
        text = f'{100 * value:.0f}'
        width, height = _text_size(draw, text, font)
        draw.text((x + (cell - width) / 2, y + (cell - height) / 2 - 1), text,
                  fill=(255, 255, 255) if value > 0.5 else _TEXT_COLOUR, font=font)
  return np.asarray(canvas)
