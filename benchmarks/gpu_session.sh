#!/bin/bash
# One device call for a 15-minute GPU lease: retrain the bundled default's transformer (benchmarks/gpu_transformer.py:
# the recipe's plain, masked, beat-grid and register-hint stages, each for a wall-clock budget) and then the GPU proof
# (gpu_check.py, budget-scaled). Stage .gpu_data/ first (the recipe's embedding cache with its beat phases and melody
# pitches, int8-packed, and the wheels):
#   FLUXMUSIC_CACHE=RUN/cache sh benchmarks/gpu_check_prepare.sh
# then move fluxmusic/default_model aside for the call (the tree + carry must stay under 64 MiB) and run
#   bash benchmarks/gpu_session.sh        (device tool: carry [".gpu_data"], timeout_s 590)
# $OUT gets back 8 files: tr/transformer-{0,1}.safetensors, tr/config.json, tr/summary.json, train.log and
# gc/gpu_check.{md,json,log}. Back here: python benchmarks/gpu_transformer.py assemble --shards DIR --out MODEL_DIR
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu_data/wheels/*.whl || exit 9
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
mkdir -p $OUT/gc $OUT/tr
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, diffusers; print(torch.__version__, transformers.__version__, diffusers.__version__)"
t0=$(date +%s)
timeout 385 python3 benchmarks/gpu_transformer.py train --pack .gpu_data/transformer_cache.npz --out $OUT/tr \
   --plain-minutes ${PLAIN_MIN:-2} --masked-minutes ${MASKED_MIN:-1} --beat-minutes ${BEAT_MIN:-1} \
   --register-minutes ${REGISTER_MIN:-1} --batch-size ${BATCH:-64} --device cuda > $OUT/train.log 2>&1
echo "transformer rc $? after $(( $(date +%s) - t0 )) s"; grep -v '^train |' $OUT/train.log | tail -30
timeout 185 python3 benchmarks/gpu_check.py --out $OUT/gc --testdata .gpu_data/official_tiny_a.npz \
   --budget ${GC_BUDGET:-160} --skip generation.default --no-onnx 2>&1 | tee $OUT/gc/gpu_check.log | tail -40
echo "gpu_check rc ${PIPESTATUS[0]}; all done after $(( $(date +%s) - t0 )) s"
