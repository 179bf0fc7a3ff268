#!/usr/bin/env bash
# The GPU checks in one go, on any CUDA machine: the benchmark on the GPU (fp32, bf16, CUDA-graph replays of the
# forward and of the sliding window, the largest scan, torch.compile last), the CUDA tests, then a training run
# through torchrun with bf16 AMP (and a short fp16 one, a resume), CUDA inference in the scan's own geometry (GPU
# and CPU stitching, the same checkpoint on the CPU) and the Dice report.
#   bash experiments/gpu_check.sh PRE RAW OUT [BENCH_SECONDS]
#     PRE: a preprocessed phantom/Synapse folder (dataset.json + cases/), RAW: a BTCV-style folder (img/, label/)
#     with the scans to segment, OUT: where the logs and the benchmark result go.
#   STEPS="bench" bash experiments/gpu_check.sh …   only some of the step groups (default "bench tests e2e").
# Every step has a time limit and its own log; one failing step does not stop the others. The benchmark result is
# OUT/<setup>.json + .md, named by the GPU and torch (e.g. gpu-h100-torch2.11-fp32-bf16); a bench step cut by its
# limit leaves what it measured in OUT/<setup>.partial.json + .md. The logs name the GPU without its UUID, and the
# temporary work folder as $W.
set -uo pipefail
PRE=${1:?usage: gpu_check.sh PRE RAW OUT [BENCH_SECONDS]}
RAW=${2:?}
OUT=${3:?}
BENCH_S=${4:-360}
PY=${PYTHON:-python3}
STEPS=" ${STEPS:-bench tests e2e} "
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS CMD...: run with a limit, log to OUT/NAME.log, print the status and the log's end
    local name=$1 limit=$2 t0=$SECONDS rc before
    shift 2
    before=$(cat "$OUT/$name.log" 2>/dev/null | wc -l)
    echo "\$ $*" >>"$OUT/$name.log"
    timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: rc $rc, $((SECONDS - t0)) s"
    tail -n "+$((before + 2))" "$OUT/$name.log" | tail -n "${TAIL:-8}"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; \
  $PY -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(0), 'monai', monai.__version__)"; } \
    >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

# Synapse-size models only (the tiny rows are for CPUs and CI). On an H100 the forward sections take ~40 s, each
# of the 12 sliding-window children (eager / CUDA graphs x fp32 / bf16 x 3 models) ~28 s (mostly process
# start-up around a 0.4-2 s measurement), the largest-volume search ~100 s: ~8.5 min; torch.compile (section
# compiled, run last) takes minutes more. (scaling, long_ct and predict_ct are CPU-memory sections: left out.)
[[ $STEPS == *" bench "* ]] && TAIL=70 step bench "$BENCH_S" $PY -m glam3d bench --device cuda --repeats 15 \
    --largest-limit 1024 --models glam_nnformer_synapse nnformer_synapse swin_unetr_synapse \
    --sections forward bf16 graph sw gpu train compiled --save "$OUT"

[[ $STEPS == *" tests "* ]] && TAIL=12 step tests 100 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py

scrub() {  # the logs name the work folder $W, not its temporary path
    sed -i "s#$W#\$W#g" "$OUT"/*.log
}
if [[ $STEPS != *" e2e "* ]]; then scrub; rm -rf "$W"; exit 0; fi
CFG=phantom_glam_nnformer_tiny   # a shipped config, by name
TAIL=4 step e2e 60 torchrun --standalone --nnodes=1 --nproc_per_node=1 -m glam3d train "$CFG" --data "$PRE" \
    --out "$W/run" --device cuda -o train.amp=bf16 --epochs 4 -o train.iters_per_epoch=25 -o train.val_every=2 \
    --no-progress
TAIL=3 step e2e 30 $PY -m glam3d train "$CFG" --data "$PRE" --out "$W/run" --device cuda -o train.amp=bf16 \
    --epochs 5 -o train.iters_per_epoch=25 -o train.val_every=2 --resume --no-progress
TAIL=3 step e2e 30 $PY -m glam3d train "$CFG" --data "$PRE" --out "$W/run16" --device cuda -o train.amp=fp16 \
    --epochs 1 -o train.iters_per_epoch=20 -o train.val_every=1 --no-progress
for how in "cuda cuda" "cuda cpu" "cpu cpu" "cuda cuda --no-cuda-graphs"; do  # on CUDA: CUDA graphs by default
    set -- $how
    TAIL=2 step e2e 40 $PY -m glam3d predict --checkpoint "$W/run/checkpoints/best.pt" --input "$RAW/img" \
        --output "$W/pred_$1_$2${3:+_eager}" --device "$1" --stitch-device "$2" ${3:-} --quiet
done
TAIL=12 step e2e 30 $PY -c "
import sys, glob, nibabel as nib, numpy as np
ref = sorted(glob.glob('$W/pred_cpu_cpu/*.nii.gz'))
for other in ('cuda_cuda', 'cuda_cpu', 'cuda_cuda_eager'):
    for f in ref:
        a = np.asarray(nib.load(f).dataobj); b = np.asarray(nib.load(f.replace('pred_cpu_cpu', 'pred_' + other)).dataobj)
        img = nib.load('$RAW/img/' + f.split('/')[-1])
        print(other, f.split('/')[-1], 'shape', b.shape, 'scan', img.shape, 'affine equal',
              np.allclose(nib.load(f).affine, img.affine), 'labels equal to CPU: %.5f' % (a == b).mean())
"
TAIL=14 step e2e 60 $PY -m glam3d evaluate --pred "$W/pred_cuda_cuda" --gt "$RAW" --out "$W/report"
scrub
rm -rf "$W"
