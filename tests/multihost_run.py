"""Run by test_multihost.py as 2 processes x 2 simulated CPU devices (argv: coordinator
address, process id): the detection evaluation's multi-process pieces without a model.

The jit driver's global outputs are cut back to this process's rows, and COCO-style
results of unequal length per process (bytes inside, as RLE masks have) are gathered
in process order. Prints one JSON line: the process id, its rows, the gathered ids.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from segjax import distributed
from segjax.train import detection_trainer, parallel


def main(coordinator_address: str, process_id: int) -> None:
  distributed.initialize('manual', coordinator_address=coordinator_address, num_processes=2,
                         process_id=process_id)
  driver = parallel.JitDriver(lambda state, batch: (state, {}), num_classes=2)
  predictor = detection_trainer.Predictor(driver)
  # Stands in for `predict`: any function of the global batch, sharded like it.
  predictor._fn = jax.jit(  # pylint: disable=protected-access
      lambda state, batch: {'boxes': batch['image'] * 2, 'num_detections': batch['image_size']},
      in_shardings=(driver.replicated, driver.data_sharding), out_shardings=driver.data_sharding)
  images = np.arange(8, dtype=np.float32).reshape(2, 4) + 100 * process_id
  out = predictor({}, {'image': images, 'image_size': np.array([1, 2]) + 10 * process_id})
  results = [{'image_id': 10 * process_id + i, 'segmentation': {'counts': b'rle' * (i + 1)}}
             for i in range(process_id + 1)]
  gathered = detection_trainer._gather_results(results)  # pylint: disable=protected-access
  print(json.dumps({'process': jax.process_index(), 'boxes': out['boxes'].tolist(),
                    'num_detections': out['num_detections'].tolist(),
                    'gathered': [[r['image_id'], r['segmentation']['counts'].decode()]
                                 for r in gathered]}))


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]))
