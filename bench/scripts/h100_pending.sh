#!/usr/bin/env bash
# The device calls queued for the next session with a GPU, in order (each ~5-9 minutes on an H100,
# inside the device tool's 10-minute limit). Run from the repository root with $OUT set:
#
#     bash bench/scripts/h100_pending.sh 1      # issue 18: CUDA-graph replay, eigh sweep, two-stage eigh and its stages
#     bash bench/scripts/h100_pending.sh 2      # issue 17 v23 (split back-transformation), tridiagonal GPU tests
#     bash bench/scripts/h100_pending.sh 3      # issue 18: the blocked QR with TSQR panels
#
# What each call settles is written in bench/linalg.md ("two-stage eigh above 128: first H100 runs",
# "stage 3 splits T") and bench/linalg_triton.md (v23). Logs and JSON land in $OUT.
set -uo pipefail
: "${OUT:?set OUT to the folder that receives the logs}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"     # the scripts under bench/ import metalcore
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"
case "${1:-}" in
1)
    # GPU tests of the graph replay and of the two-stage path at full size (random, rank n/4, κ 1e6).
    timeout 150 python -m pytest -q -x tests/test_graphs.py tests/linalg/test_eigh.py \
        -k "graphs or (gpu_eigh_path_full_size and twostage)" 2>&1 | tail -15 | tee "$OUT/tests.log"
    # The selection sweep above 128, so that automatic selection can take the path where it wins.
    timeout 180 python -m metalcore.bench --device cuda --selection --ops eigh --dtypes float32,float64 \
        --sizes 256,512,1024 2>&1 | grep -E "size=|wrote|Error" | tee "$OUT/selection-eigh.log" | tail -30
    cp metalcore/_tables/*.json "$OUT/"
    # Wall (eager and replayed) and GPU ms, host ms and kernel counts, rank-n/4 input beside random;
    # the stage rows, with stage 2's 'wave-launches' and stage 4a's 'sweep-tiles' beside the defaults.
    timeout 260 python bench/scripts/twostage_check.py --bands 16 --profile --skip torch \
        --cases 64x256:float32,16x512:float32,8x1024:float32,64x256:float64 \
        --out "$OUT" 2>&1 | tee "$OUT/twostage.log" | tail -60
    ;;
2)
    # v23: split-16 / split-32 beside the in-kernel back-transformation; then the GPU tests.
    timeout 240 python bench/scripts/tridiag_stages.py 2>&1 | tee "$OUT/tridiag-stages.log" | tail -40
    timeout 150 python -m pytest -q -x tests/linalg/test_eigh.py tests/linalg/test_svd.py \
        -k "gpu and (tridiag or bidiag)" 2>&1 | tail -10 | tee "$OUT/tests.log"
    timeout 180 python bench/scripts/batched_eigh_svd_check.py --tridiag --no-hang --out "$OUT" 2>&1 \
        | tee "$OUT/tridiag.log" | tail -30
    ;;
3)
    # Issue 18 item 3: the blocked QR with TSQR panels ('tsqr' path) at 4096², 11008×4096 and a batch,
    # then the batched set, where its rows sit beside geqrf, tall panels and torch.
    timeout 200 python -m pytest -q -x tests/linalg/test_qr.py -k "gpu and tsqr" 2>&1 | tail -10 | tee "$OUT/tests.log"
    timeout 330 python bench/scripts/qr_large_check.py --batched --out "$OUT" 2>&1 | tee "$OUT/qr-batched.log" | tail -60
    ;;
*)
    echo "usage: bash bench/scripts/h100_pending.sh 1|2|3" >&2
    exit 2
    ;;
esac
