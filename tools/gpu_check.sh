#!/usr/bin/env bash
# Shampoo and SOAP on one GPU: installs the [gpu] extra, runs the optimizer
# tests on the GPU, then the default bench task (digits-ae) and the
# Transformer LM task (pydoc-lm) with the library's defaults (pipelined
# roots: the host's CPUs compute them while the GPU trains) and with roots
# in the step, then `scale` up to the ~50 M-parameter LM, and writes
# everything under $OUT (default gpu_out/).
#
#   bash tools/gpu_check.sh                 # on a machine with a CUDA GPU
#   OUT=/tmp/gpu STEPS=600 bash tools/gpu_check.sh
#
# The bench prints its table and writes results.json per task; results go
# into docs/benchmarks.md ("GPU") with this command.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-2000}
mkdir -p "$OUT"
export PIP_DISABLE_PIP_VERSION_CHECK=1 TF_CPP_MIN_LOG_LEVEL=2

pip install -q -e ".[gpu,bench,test]" 2>&1 | tail -2
python - <<'EOF' | tee "$OUT/devices.txt"
import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
print("tensorflow", tf.__version__, "GPUs:", gpus)
assert gpus, "no GPU visible to TensorFlow"
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/devices.txt" || true

# The optimizer tests (NumPy references, Keras integration, XLA, saving) run
# on the GPU when one is visible.
python -m pytest tests/optimizers tests/linalg -q -p no:cacheprovider \
    --junitxml="$OUT/tests.xml" 2>&1 | tail -5 | tee "$OUT/tests.txt"

for task in digits-ae pydoc-lm; do
    tf-secondorder bench --task "$task" --optimizers adam,shampoo,soap \
        --steps "$STEPS" --verbose 0 --out "$OUT/$task" 2>&1 | tee "$OUT/$task.txt"
    tf-secondorder bench --task "$task" --optimizers adam,shampoo \
        --shampoo-option root_refresh=in_step --steps "$STEPS" --verbose 0 \
        --out "$OUT/$task-instep" 2>&1 | tee "$OUT/$task-instep.txt"
done
# First step, step time, refresh and memory against model size (the GPU
# trains; pipelined roots are computed on the host).
tf-secondorder scale --models mlp-2048,lm-10m,lm-50m \
    --optimizers adam,shampoo,shampoo-instep,soap --steps 60 --frequency 20 \
    --out "$OUT/scale" 2>&1 | tee "$OUT/scale.txt"
echo "wrote $OUT"
