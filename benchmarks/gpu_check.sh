#!/usr/bin/env bash
# The GPU checks of fused linear KD, as one script for a machine with one CUDA GPU and no network
# (under 8 minutes on an H100). Packages beyond torch and transformers come from wheels carried in
# benchmarks/wheels/ (AutoModel, ModelOpt, Liger-Kernel and their dependencies), as on an air-gapped cluster.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine; tables in $OUT (benchmarks/gpu_check_out/)
#   bash benchmarks/gpu_check.sh --dry-run   # the same Python at tiny sizes on CPU (tests/test_benchmarks.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/gpu_check_out}
mkdir -p "$OUT"
if [[ "${1:-}" == "--dry-run" ]]; then
    STEP=(--dry-run --dtype float32)
    LOSS=(--quick)
    HEAD=(--quick)
else
    if [[ -d benchmarks/wheels ]]; then
        "$PY" -m pip install --quiet --no-index --find-links benchmarks/wheels benchmarks/wheels/*.whl
    fi
    STEP=(--dtype bfloat16 --procs 1 --vocab 201088 --seq 2048 8192 --longest --max-seq 131072 --budget-gb 70)
    LOSS=()
    HEAD=()
fi
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
# A whole KD step, bf16, one GPU: peak memory, step time and mfu of fused, unfused and AutoModel's recipe.
"$PY" benchmarks/fused_kd_step.py "${STEP[@]}" --output "$OUT/kd_step.md"
# The loss alone: loss.KDLoss vs AutoModel's KDLoss (time and memory).
"$PY" benchmarks/kd_loss.py "${LOSS[@]}" --output "$OUT/kd_loss.md"
# The loss stage alone from hidden states (GPT-OSS's head): fused vs its four-matmul floor vs logits paths vs Liger.
"$PY" benchmarks/fused_linear_loss.py "${HEAD[@]}" --output "$OUT/fused_linear_loss.md"
if [[ "${1:-}" != "--dry-run" ]]; then
    # KD from a teacher cache vs online KD vs CE only, bf16, GPT-OSS's vocabulary (the dry run skips it: CI time).
    "$PY" benchmarks/cached_kd_step.py --dtype bfloat16 --procs 1 --vocab 201088 --seq 2048 8192 --output "$OUT/cached_kd_step.md"
fi
echo "tables: $OUT/kd_step.md $OUT/kd_loss.md $OUT/fused_linear_loss.md"
