#!/usr/bin/env bash
# Every row of experiments/benchmarks/README.md; raw JSON goes to results/.
# CPU, 2 cores, torch.set_num_threads(2). Several hours on a loaded machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=experiments/benchmarks/results
B="python -m segjax.benchmark"
SEG="--batch_size=2 --image_size=320,320 --compare=torchvision --steps=5"
DEEPLAB="--config=configs/deeplab_v3.py:voc --config.model.backbone=resnet50 --config.model.output_stride=8"
FCN="--config=configs/fcn_resnet50.py:voc"
MRCNN="--config=configs/mask_rcnn_r50_fpn.py:coco --config.model.freeze_bn=False --config.model.box_score_thresh=0.0 --batch_size=1 --image_size=512,512 --compare=torchvision --steps=5"

$B $FCN --mode=infer $SEG --json=$R/fcn_resnet50_infer.json
$B $FCN --mode=train $SEG --json=$R/fcn_resnet50_train.json
$B $DEEPLAB --mode=infer $SEG --json=$R/deeplabv3_infer.json
$B $DEEPLAB --mode=train $SEG --json=$R/deeplabv3_train.json
$B $DEEPLAB --mode=infer --batch_size=2 --image_size=320,320 --compare=torchvision --steps=7 --json=$R/deeplabv3_infer_rerun.json
$B $MRCNN --mode=infer --json=$R/maskrcnn_infer.json
$B $MRCNN --mode=train --json=$R/maskrcnn_train_taps_in_switch.json   # maskrcnn_train.json: the same before the fix
$B $MRCNN --mode=train --conv_weight_grad=taps_1x1 --json=$R/maskrcnn_train_taps_in_switch_taps_1x1.json
python -m segjax.benchmarks.nested_conv_bench > $R/nested_conv_bench.md
$B --workload=roi_align --compare=torchvision --steps=7 --json=$R/roi_align.json
$B --workload=roi_align --roi_sampling_ratio=-1 --compare=torchvision --steps=7 --json=$R/roi_align_adaptive.json
# Memory: each side in its own process (what --memory does after a timed run).
$B $FCN --mode=infer --batch_size=2 --image_size=320,320 --steps=3 --memory_side=segjax
$B $FCN --mode=infer --batch_size=2 --image_size=320,320 --steps=3 --memory_side=torchvision
$B --workload=pipeline --config=configs/fcn8s.py --batch_size=2 --image_size=320,320 --steps=20 --json=$R/pipeline_320.json
$B --workload=pipeline --config=configs/fcn8s.py --steps=20 --json=$R/pipeline_digit_scenes.json
$B --workload=pipeline --config=configs/fcn8s.py --steps=30 --json=$R/pipeline_digit_scenes_rerun.json
$B --workload=pipeline --config=configs/fcn8s.py --config.dataset.num_workers=2 --steps=30 --json=$R/pipeline_digit_scenes_workers2.json
# Pipeline vs train step, throughput over 200 batches, without and with worker processes (2026-12-03).
for w in 0 2; do
  $B --workload=pipeline --config=configs/fcn8s.py --steps=200 --compare=train_step --config.dataset.num_workers=$w --json=$R/pipeline_fcn8s_workers${w}_vs_train_step.json
done
# The conv filter-gradient lever: segjax against itself with XLA's gradient, A/B.
$B $DEEPLAB --mode=train --batch_size=2 --image_size=320,320 --steps=5 --conv_weight_grad=taps_1x1 --compare=xla_conv_grad --json=$R/deeplabv3_train_taps_1x1.json
$B $FCN --mode=train --batch_size=2 --image_size=320,320 --steps=5 --conv_weight_grad=taps_1x1 --compare=xla_conv_grad --json=$R/fcn_resnet50_train_taps_1x1_vs_xla.json
$B $DEEPLAB --mode=train $SEG --conv_weight_grad=taps_1x1 --json=$R/deeplabv3_train_taps_1x1_vs_torchvision.json
$B $FCN --mode=train $SEG --conv_weight_grad=taps_1x1 --json=$R/fcn_resnet50_train_taps_1x1.json
python -m segjax.benchmarks.conv_grad_bench
# bf16 on CPU
$B $FCN --config.model.dtype=bfloat16 --mode=infer $SEG --json=$R/fcn_resnet50_infer_bf16.json
# FCN-8s on VGG-16 against torchvision's vgg16 convolutionalised (2026-12-04): before the
# conv changes (fcn8s_vgg16_{infer,train}.json), with the row-blocked filter gradient
# (_train_blocked.json) and with im2col for fc6 too (_im2col.json).
VGG="--config=configs/fcn8s.py:voc --batch_size=2 --image_size=320,320 --compare=torchvision"
$B $VGG --mode=infer --steps=7 --json=$R/fcn8s_vgg16_infer_im2col.json
$B $VGG --mode=train --steps=5 --json=$R/fcn8s_vgg16_train_im2col.json

# Train steps with both conv gradients from the output gradient's windows and 2-D tap
# matmuls (2026-12-04, session 16).
$B $FCN --mode=train $SEG --json=$R/fcn_resnet50_train_output_windows.json
$B $DEEPLAB --mode=train $SEG --json=$R/deeplabv3_train_output_windows.json
$B $MRCNN --mode=train --json=$R/maskrcnn_train_output_windows.json
$B $VGG --mode=train --steps=5 --json=$R/fcn8s_vgg16_train_output_windows.json
# ... with the Winograd forward under differentiation and layers.max_pool too (same session),
# and the inference rows rerun with the 2-D tap matmuls.
$B $FCN --mode=train $SEG --json=$R/fcn_resnet50_train_winograd_fwd.json
$B $DEEPLAB --mode=train $SEG --json=$R/deeplabv3_train_winograd_fwd.json
$B $MRCNN --mode=train --json=$R/maskrcnn_train_winograd_fwd.json
$B $VGG --mode=train --steps=5 --json=$R/fcn8s_vgg16_train_winograd_fwd.json
$B $FCN --mode=infer --batch_size=2 --image_size=320,320 --compare=torchvision --steps=7 --json=$R/fcn_resnet50_infer_2d_taps.json
$B $DEEPLAB --mode=infer --batch_size=2 --image_size=320,320 --compare=torchvision --steps=7 --json=$R/deeplabv3_infer_2d_taps.json
# ... with conv_weight_grad='tap_matmuls_nested' in the Mask R-CNN mask branch (same session).
$B $MRCNN --mode=train --json=$R/maskrcnn_train_nested_tap_matmuls.json
# Both gradients of the wide dense 3x3 convs by Winograd: the input gradient F(2x2, 3x3)
# with the flipped kernel, the filter gradient F(3x3, 2x2) (2026-12-05, session 17).
$B $FCN --mode=train $SEG --json=$R/fcn_resnet50_train_winograd_grads.json
$B $DEEPLAB --mode=train $SEG --json=$R/deeplabv3_train_winograd_grads.json
$B $MRCNN --mode=train --json=$R/maskrcnn_train_winograd_grads.json
$B $VGG --mode=train --steps=5 --json=$R/fcn8s_vgg16_train_winograd_grads.json
$B $FCN --mode=infer --batch_size=2 --image_size=320,320 --compare=torchvision --steps=7 --json=$R/fcn_resnet50_infer_s17.json
# ... and the Mask R-CNN train row with every step from each side's initial state.
$B $MRCNN --mode=train --same_state --json=$R/maskrcnn_train_same_state.json

# 2026-12-05, session 18: narrow 3x3 convs by Winograd when not differentiated, and
# --host_malloc (first version: mallopt in the process, 'auto' = semantic models on CPU;
# 'system' to compare).
$B $FCN --mode=infer --batch_size=2 --image_size=320,320 --compare=torchvision --steps=9 --json=$R/fcn_resnet50_infer_host_malloc.json
$B $FCN --mode=infer --batch_size=2 --image_size=320,320 --compare=torchvision --steps=9 --host_malloc=system --json=$R/fcn_resnet50_infer_system_malloc.json
$B $FCN --mode=train $SEG --json=$R/fcn_resnet50_train_host_malloc.json
$B $FCN --mode=train $SEG --host_malloc=system --json=$R/fcn_resnet50_train_system_malloc.json
$B $DEEPLAB --mode=train $SEG --json=$R/deeplabv3_train_host_malloc.json
$B $DEEPLAB --mode=infer --batch_size=2 --image_size=320,320 --compare=torchvision --steps=7 --json=$R/deeplabv3_infer_host_malloc.json
$B $MRCNN --mode=train --same_state --host_malloc=retain --json=$R/maskrcnn_train_same_state_host_malloc.json   # first version (mallopt in the process)
$B $MRCNN --mode=train --same_state --host_malloc=retain --json=$R/maskrcnn_train_same_state_retain_2.json
$B $MRCNN --mode=train --same_state --host_malloc=system --json=$R/maskrcnn_train_same_state_system_malloc.json
$B $MRCNN --mode=infer --host_malloc=retain --json=$R/maskrcnn_infer_host_malloc.json
# The same settings from the environment: run as
#   MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967296 $B $MRCNN --mode=train --same_state --host_malloc=system
# with the first version; with the current code (which restarts itself with them, and
# without them for 'system') that is:
$B $MRCNN --mode=train --same_state --host_malloc=retain --json=$R/maskrcnn_train_same_state_env_retain.json
MALLOC_ARENA_MAX=1 $B $MRCNN --mode=train --same_state --host_malloc=system --json=$R/maskrcnn_train_same_state_env_arena1.json
$B $FCN --mode=infer --batch_size=2 --image_size=320,320 --steps=3 --memory_side=segjax
$B $FCN --mode=infer --batch_size=2 --image_size=320,320 --steps=3 --memory_side=torchvision
$B $FCN --mode=infer --batch_size=2 --image_size=320,320 --compare=torchvision --steps=9 --json=$R/fcn_resnet50_infer_host_malloc_env.json   # final code
# Input pipeline in one thread, tfds decoding with OpenCV (2026-12-06, session 19):
# the default (dataset.prefetch=0), the former default's 16 reader threads, the default
# again, and 2 worker processes.
$B --workload=pipeline --config=configs/fcn8s.py --steps=200 --compare=train_step --json=$R/pipeline_fcn8s_default_1_s19.json
$B --workload=pipeline --config=configs/fcn8s.py --steps=200 --compare=train_step --config.dataset.prefetch=16 --json=$R/pipeline_fcn8s_prefetch16_s19.json
$B --workload=pipeline --config=configs/fcn8s.py --steps=200 --compare=train_step --json=$R/pipeline_fcn8s_default_2_s19.json
$B --workload=pipeline --config=configs/fcn8s.py --steps=200 --compare=train_step --config.dataset.num_workers=2 --json=$R/pipeline_fcn8s_workers2_s19.json
# Rows rechecked in session 19 (same commands as above, new JSON names).
$B $FCN --mode=infer --batch_size=2 --image_size=320,320 --compare=torchvision --steps=9 --json=$R/fcn_resnet50_infer_s19.json
$B $FCN --mode=train $SEG --json=$R/fcn_resnet50_train_s19.json
$B $DEEPLAB --mode=train $SEG --json=$R/deeplabv3_train_s19.json
$B --workload=roi_align --compare=torchvision --steps=7 --json=$R/roi_align_s19.json
# The input pipeline on full-size JPEGs: a synthetic VOC-sized build, then 16 and 0 reader threads.
python experiments/benchmarks/voc_sized.py /tmp/voc_sized
for rep in 1 2; do for p in 16 0; do
  $B --workload=pipeline --config=configs/fcn8s.py:voc --config.dataset.name=voc_segmentation --config.dataset.train_split=train --config.dataset.data_dir=/tmp/voc_sized/tfds --batch_size=8 --steps=20 --config.dataset.prefetch=$p --json=$R/pipeline_voc_sized_prefetch${p}_${rep}_s19.json
done; done
# 2026-12-06, session 20: RoIAlign 'gather' in chunks of boxes (custom VJP), CPU 'auto' break-even 8
$B --workload=roi_align --compare=torchvision --steps=7 --json=$R/roi_align_gather_s20_1.json
$B --workload=roi_align --compare=torchvision --steps=7 --json=$R/roi_align_gather_s20_2.json
$B $MRCNN --mode=infer --json=$R/maskrcnn_infer_gather_chunks_s20.json
$B $MRCNN --mode=train --same_state --json=$R/maskrcnn_train_same_state_gather_chunks_s20.json
$B $MRCNN --mode=train --json=$R/maskrcnn_train_gather_chunks_s20.json
python -m segjax.benchmarks.roi_align_bench          # experiments/roi_align/results.md, 2026-12-06
python -m segjax.benchmarks.roi_align_bench --maps
# 2026-12-06, session 20: synchronous dispatch with the retained heap (host_memory.dispatch_synchronously)
$B $FCN --mode=train --batch_size=2 --image_size=320,320 --steps=3 --memory_side=segjax   # and --host_malloc=system
$B $FCN --mode=train --batch_size=2 --image_size=320,320 --steps=3 --memory_side=torchvision
$B $FCN --mode=train --batch_size=2 --image_size=320,320 --steps=3 --memory --compare=torchvision --json=$R/fcn_resnet50_train_memory_s20.json
$B $FCN --mode=train $SEG --json=$R/fcn_resnet50_train_sync_s20.json
# the train loops (process max RSS with /usr/bin/time -f %M; s per step from the log's timestamps):
#   python -m segjax.main --config=configs/fcn8s.py --config.num_train_steps=400 --workdir=/tmp/wd [--host_malloc=system]
#   python -m segjax.main --config=configs/fcn_resnet50.py:voc --config.dataset.name=voc_segmentation --config.dataset.train_split=train \
#     --config.dataset.data_dir=/tmp/voc_sized/tfds --config.dataset.crop_size=320,320 --config.batch_size=2 --config.eval_batch_size=2 \
#     --config.num_train_steps=40 --config.log_every_steps=10 --config.eval_every_steps=1000 --workdir=/tmp/wd_r50 [--host_malloc=system]
$B --workload=roi_align --compare=torchvision --steps=7 --json=$R/roi_align_gather_sync_s20.json
$B $MRCNN --mode=train --same_state --json=$R/maskrcnn_train_same_state_sync_s20.json
# 2026-12-06, session 21: BatchNorm's gradient keeps x only (layers.BatchNorm), conv backward tied to dy (layers.after)
$B $FCN --mode=train --batch_size=2 --image_size=320,320 --steps=3 --memory --compare=torchvision --json=$R/fcn_resnet50_train_memory_s21.json
$B $FCN --mode=train $SEG --json=$R/fcn_resnet50_train_s21.json
python experiments/benchmarks/ab_train_step_memory.py --pairs=7      # old (flax BatchNorm, no tie, select) vs new, one process
$B $DEEPLAB --mode=train $SEG --json=$R/deeplabv3_train_s21.json
$B $MRCNN --mode=train --same_state --json=$R/maskrcnn_train_same_state_s21.json
$B $DEEPLAB --mode=train --batch_size=2 --image_size=320,320 --steps=3 --memory --compare=torchvision --json=$R/deeplabv3_train_memory_s21.json
#   /usr/bin/time -f %M python -m segjax.main --config=configs/fcn8s.py --config.num_train_steps=400 --workdir=/tmp/wd
# the same, with the skipped-step gate a conditional (TrainState.apply_gradients_if_finite)
$B $FCN --mode=train --batch_size=2 --image_size=320,320 --steps=3 --memory --compare=torchvision --json=$R/fcn_resnet50_train_memory_s21_cond.json
$B $FCN --mode=train $SEG --json=$R/fcn_resnet50_train_s21_cond.json
$B $DEEPLAB --mode=train --batch_size=2 --image_size=320,320 --steps=3 --memory --compare=torchvision --json=$R/deeplabv3_train_memory_s21_cond.json
# 2026-12-06, session 22: Winograd chunks and tap matmuls ordered (layers.after), ResNet block outputs stored (layers.computed_once)
$B $FCN --mode=infer --batch_size=2 --image_size=320,320 --steps=3 --memory --compare=torchvision --json=$R/fcn_resnet50_infer_memory_s22.json
$B $FCN --mode=train --batch_size=2 --image_size=320,320 --steps=3 --memory --compare=torchvision --json=$R/fcn_resnet50_train_memory_s22.json
$B $DEEPLAB --mode=infer --batch_size=2 --image_size=320,320 --steps=5 --memory --compare=torchvision --json=$R/deeplabv3_infer_memory_s22.json
# in-process A/Bs against the layers of 7306d02 (session 21's last commit), temporaries printed:
python experiments/benchmarks/ab_layers_commit.py --mode=infer --pairs=9
python experiments/benchmarks/ab_layers_commit.py --mode=train --pairs=7
python experiments/benchmarks/ab_layers_commit.py $DEEPLAB --mode=infer --pairs=7
python experiments/benchmarks/ab_layers_commit.py --config=configs/mask_rcnn_r50_fpn.py:coco --config.model.box_score_thresh=0.0 --batch_size=1 --image_size=512,512 --mode=infer --pairs=7
python experiments/benchmarks/ab_layers_commit.py --config=configs/mask_rcnn_r50_fpn.py:coco --config.model.freeze_bn=False --config.model.box_score_thresh=0.0 --batch_size=1 --image_size=512,512 --mode=train --pairs=7
$B $DEEPLAB --mode=train --batch_size=2 --image_size=320,320 --steps=3 --memory --compare=torchvision --json=$R/deeplabv3_train_memory_s22.json
python experiments/benchmarks/ab_layers_commit.py $DEEPLAB --mode=train --pairs=7
# 2026-12-06, session 23: model.remat through layers.recompute_in_backward
python experiments/benchmarks/compiled_step.py --mode=train --batch_size=2 --image_size=320,320
python experiments/benchmarks/compiled_step.py --mode=train --batch_size=2 --image_size=320,320 --config.model.remat=True
python experiments/benchmarks/compiled_step.py --mode=train --batch_size=4 --image_size=512,512
python experiments/benchmarks/compiled_step.py --mode=train --batch_size=4 --image_size=512,512 --config.model.remat=True
$B $FCN --config.model.remat=True --mode=train --batch_size=2 --image_size=320,320 --steps=3 --memory --compare=torchvision --json=$R/fcn_resnet50_train_memory_remat_s23.json
$B $DEEPLAB --config.model.remat=True --mode=train --batch_size=2 --image_size=320,320 --steps=3 --memory --compare=torchvision --json=$R/deeplabv3_train_memory_remat_s23.json
$B $FCN --config.model.remat=True --mode=train --batch_size=4 --image_size=512,512 --steps=3 --memory --compare=torchvision --json=$R/fcn_resnet50_train_memory_4x512_remat_True_s23.json
$B $FCN --config.model.remat=False --mode=train --batch_size=4 --image_size=512,512 --steps=3 --memory --compare=torchvision --json=$R/fcn_resnet50_train_memory_4x512_remat_False_s23.json
