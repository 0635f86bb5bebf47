"""Evaluation: semantic-segmentation metrics from a global confusion matrix, COCO AP.

    from segjax import evaluation
    confusion = evaluation.confusion_matrix(predictions, labels, valid, num_classes)  # [C, C]
    metrics = evaluation.metrics_from_confusion(np.asarray(confusion))   # 'miou', ...
    gt = evaluation.ground_truth_from_source(records, num_classes)       # pycocotools COCO
    ap = evaluation.coco_evaluate(gt, evaluation.detections_to_coco(outputs, batch))

`confusion_matrix` is a jit-able JAX function (sum it over batches and devices);
the rest run on the host. COCO AP is pycocotools' `COCOeval`, never re-implemented.
Modules: `segmentation_metrics`, `coco_eval`.
"""

from segjax.evaluation import coco_eval, segmentation_metrics
from segjax.evaluation.coco_eval import (coco_from_annotations, detections_to_coco,
                                         encode_masks, ground_truth_from_source)
from segjax.evaluation.coco_eval import evaluate as coco_evaluate
from segjax.evaluation.segmentation_metrics import confusion_matrix, metrics_from_confusion

__all__ = [
    'coco_eval', 'segmentation_metrics',
    'confusion_matrix', 'metrics_from_confusion',
    'coco_evaluate', 'coco_from_annotations', 'detections_to_coco', 'encode_masks',
    'ground_truth_from_source',
]
