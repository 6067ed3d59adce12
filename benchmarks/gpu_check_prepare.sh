#!/bin/sh
# Stage what the lent GPU machine lacks into .gpu_data/ (ignored by git): the official parity data and the
# diffusers wheel (its image has torch, triton, transformers, tokenizers, safetensors, numpy, but no diffusers;
# it has no network). Name `.gpu_data` in the device call's `carry`; docs/gpu.md gives the whole call.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .gpu_data/wheels
for d in shared/testdata ../shared/testdata; do
    if [ -f "$d/official_tiny_a.npz" ]; then cp "$d/official_tiny_a.npz" .gpu_data/; break; fi
done
[ -f .gpu_data/official_tiny_a.npz ] || echo "warning: official_tiny_a.npz not found; model.parity will be skipped" >&2
# A pure-Python wheel: the platform flags only satisfy pip's cross-platform download rules.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu_data/wheels "diffusers==${DIFFUSERS_VERSION:-0.42.1}"
# The transformer run of benchmarks/gpu_session.sh: the recipe's embedding cache, int8-packed (~44 MB), and
# soundfile (+ its needs) for the package's audio imports.
if [ -n "${FLUXMUSIC_CACHE:-}" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu_data/wheels soundfile==0.13.1 cffi==2.0.0 pycparser==2.23
    python3 benchmarks/gpu_transformer.py pack --cache "$FLUXMUSIC_CACHE" --out .gpu_data/transformer_cache.npz
fi
ls -l .gpu_data .gpu_data/wheels
