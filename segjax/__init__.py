"""segjax: semantic and instance segmentation in JAX/Flax (FCN, DeepLab, Mask R-CNN).

Importing `segjax` imports nothing else (so `segjax.export.load` stays jax + numpy).
The library packages, each with its public names in `__all__`:

  segjax.models               backbones, FCN, DeepLab, layers, registries, `build_model`
  segjax.models.detection     boxes, NMS, RoIAlign / RoIPool, anchors, matching, R-CNNs
  segjax.models.crf           dense CRF mean field (exact and permutohedral lattice)
  segjax.evaluation           confusion-matrix mIoU, COCO AP (pycocotools)
  segjax.export               `jax.export` of a trained model, and its loader

Entry points: `python -m segjax.main` (train + evaluate), `python -m segjax.export`.
"""
