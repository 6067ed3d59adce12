#!/bin/bash
# One device call for a 15-minute GPU lease: the GPU proof (gpu_check.py, budget-scaled) and then three vocoder
# variants (benchmarks/vocoder_variants.py) trained side by side on packed corpus audio. Stage .gpu_data/ first:
#   FLUXMUSIC_CORPUS=RUN/corpus/manifest.jsonl sh benchmarks/gpu_check_prepare.sh
# then move fluxmusic/default_model aside for the call (the tree + carry must stay under 64 MiB) and run
#   bash benchmarks/gpu_session.sh        (device tool: carry [".gpu_data"], timeout_s 590)
# $OUT gets back at most 7 files: gc/gpu_check.{md,json,log}, voc_<variant>.safetensors x3, vocoder_logs.tar.gz.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu_data/wheels/*.whl || exit 9
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p $OUT/gc /tmp/logs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, diffusers, soundfile; print(torch.__version__, transformers.__version__, diffusers.__version__)"
t0=$(date +%s)
timeout 330 python3 benchmarks/gpu_check.py --out $OUT/gc --testdata .gpu_data/official_tiny_a.npz \
   --budget ${GC_BUDGET:-300} --skip generation.default --no-onnx 2>&1 | tee $OUT/gc/gpu_check.log | tail -60
echo "gpu_check rc ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
for v in pa_comb pa_comb_p160 pa_p160; do
  python3 benchmarks/gpu_vocoder.py train --data .gpu_data/vocoder --variant $v --minutes ${TRAIN_MIN:-3.6} \
     --run /tmp/runs/$v > /tmp/logs/$v.log 2>&1 &
done
wait
for v in pa_comb pa_comb_p160 pa_p160; do
  tail -3 /tmp/logs/$v.log
  python3 benchmarks/gpu_vocoder.py export --run /tmp/runs/$v --out /tmp/exp/$v --variant $v > /dev/null 2>&1 \
    && cp /tmp/exp/$v/model.safetensors $OUT/voc_$v.safetensors && cat /tmp/exp/$v/trained.json
  cp /tmp/runs/$v/log.jsonl /tmp/logs/$v.jsonl 2>/dev/null
done
tar czf $OUT/vocoder_logs.tar.gz -C /tmp logs
echo "all done after $(( $(date +%s) - t0 )) s"
