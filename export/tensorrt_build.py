"""Build TensorRT engines from a :class:`~fluxmusic.export.tensorrt_plan.BuildPlan` (needs a CUDA GPU).

``tensorrt`` is imported lazily, so this module imports anywhere; asking it to build without a CUDA GPU
fails with one clear :class:`FluxMusicError`. Written against the TensorRT 10 Python API: ``OnnxParser``
into a (strongly typed where the plan says so) network, one ``IBuilderConfig`` per engine with the
optimisation profiles, precision flags and optimisation level, a timing cache shared by all engines of a run
and kept on disk for the next one, ``build_serialized_network``, and an atomic write of every plan file.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fluxmusic.export.tensorrt_plan import (
    MANIFEST,
    MANIFEST_FORMAT,
    BuildPlan,
    ComponentBuild,
    short_version,
    sm_of,
)

from fluxmusic.checkpoint import atomic_write_bytes
from fluxmusic.errors import FluxMusicError

NEEDS_GPU = (
    "TensorRT needs a CUDA GPU: building engines (and running them) is not possible here because CUDA is not "
    "available; use `fluxmusic export tensorrt --dry-run` to print the build plan"
)
DEFAULT_WORKSPACE_GB = 8.0

ProgressFn = Callable[[str], None]


def require_tensorrt():
    """The ``tensorrt`` module, after checking there is a CUDA GPU to build and run engines on."""
    import torch

    if not torch.cuda.is_available():
        raise FluxMusicError(NEEDS_GPU)
    try:
        import tensorrt as trt
    except ImportError as e:
        raise FluxMusicError(
            f"TensorRT is not installed ({e}); on the GPU machine: pip install 'fluxmusic[tensorrt]' (TensorRT >= 10)"
        ) from e
    if int(short_version(trt.__version__).split(".")[0]) < 10:
        raise FluxMusicError(f"TensorRT {trt.__version__} is too old; fluxmusic needs TensorRT >= 10")
    return trt


def gpu_target(device: int = 0) -> tuple[str, int, str]:
    """(TensorRT version, compute capability as sm int, GPU name) of the build machine."""
    import torch

    trt = require_tensorrt()
    return trt.__version__, sm_of(torch.cuda.get_device_capability(device)), torch.cuda.get_device_name(device)


def timing_cache_path(out_dir: Path, trt_version: str, sm: int) -> Path:
    # a timing cache is only valid for one TensorRT version and one GPU: the name says which
    return out_dir / f"timing.trt{short_version(trt_version)}.sm{sm}.cache"


def make_logger(trt, verbose: bool = False):
    """TensorRT's own logger: warnings and errors (or everything) to stderr."""
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


def _parse_onnx(trt, builder, logger, build: ComponentBuild):
    if build.onnx is None:
        raise FluxMusicError(f"no ONNX graph for {build.component}: export it first with `fluxmusic export onnx`")
    flags = 0
    if build.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif int(trt.__version__.split(".")[0]) >= 11:
        # TensorRT 11 builds strongly typed networks only: precision must come from the graph itself
        raise FluxMusicError(
            f"{build.component} in {build.precision} needs a {build.precision} ONNX graph on TensorRT "
            f"{trt.__version__} (strongly typed only); export one (`fluxmusic export onnx --fp16`) or use fp32"
        )
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data (<name>.onnx.data) relative to the file
    if not parser.parse_from_file(str(build.onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FluxMusicError(f"TensorRT cannot parse {build.onnx}: {errors}")
    return network, parser


def _configure(trt, builder, network, build: ComponentBuild, plan: BuildPlan, cache, workspace_gb: float):
    config = builder.create_builder_config()
    config.builder_optimization_level = plan.opt_level
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for flag in build.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if build.precision == "fp32":
        # TF32 is on by default and would cost the 1e-4 fp32 parity the validate thresholds ask for
        config.clear_flag(trt.BuilderFlag.TF32)
    config.set_timing_cache(cache, ignore_mismatch=False)
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for p in build.profiles:
        profile = builder.create_optimization_profile()
        for name, r in p.shapes:
            if name not in names:
                raise FluxMusicError(f"{build.onnx} has no input {name!r}; its inputs: {', '.join(sorted(names))}")
            profile.set_shape(name, r.min, r.opt, r.max)
        config.add_optimization_profile(profile)
    return config


def build_engines(
    plan: BuildPlan,
    out_dir: str | Path,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    verbose: bool = False,
    progress: ProgressFn | None = None,
) -> list[Path]:
    """Build every engine of ``plan`` into ``out_dir``; returns the engine paths.

    The plan must target this machine (TensorRT version and GPU compute capability), so an engine is never
    written under a name that does not describe it. The timing cache is shared by all engines and saved.
    """
    say = progress or (lambda m: print(m, file=sys.stderr, flush=True))
    trt = require_tensorrt()
    version, sm, gpu = gpu_target()
    if plan.trt_version != short_version(version) or plan.sm != sm:
        raise FluxMusicError(
            f"the plan targets TensorRT {plan.trt_version} on sm{plan.sm}, but this machine has TensorRT "
            f"{short_version(version)} on sm{sm} ({gpu}); plan again without --sm/--trt-version"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = make_logger(trt, verbose)
    builder = trt.Builder(logger)
    cache_path = timing_cache_path(out_dir, version, sm)
    # one ITimingCache for the whole run: layers shared between engines are timed once
    seed_config = builder.create_builder_config()
    cache = seed_config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    written = []
    for i, build in enumerate(plan.builds, 1):
        t0 = time.perf_counter()
        say(f"[{i}/{len(plan.builds)}] {build.component}: parsing {build.onnx}")
        network, _parser = _parse_onnx(trt, builder, logger, build)
        config = _configure(trt, builder, network, build, plan, cache, workspace_gb)
        say(f"[{i}/{len(plan.builds)}] {build.component}: building {build.precision} ({len(build.profiles)} profiles)")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise FluxMusicError(f"TensorRT failed to build {build.component} (see the TensorRT log above)")
        path = out_dir / build.engine.filename
        atomic_write_bytes(path, memoryview(serialized))
        atomic_write_bytes(cache_path, memoryview(cache.serialize()))
        _update_manifest(out_dir, plan, build, version, sm, gpu)
        written.append(path)
        say(
            f"[{i}/{len(plan.builds)}] {build.component}: wrote {path.name} "
            f"({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s"
        )
    return written


def _update_manifest(out_dir: Path, plan: BuildPlan, build: ComponentBuild, version: str, sm: int, gpu: str) -> None:
    """``engines.json``: one entry per engine file, so builds of several precisions can share a directory."""
    from fluxmusic.checkpoint import atomic_write_text

    path = out_dir / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {"format": MANIFEST_FORMAT, "version": 1}
    entry = build.to_dict()
    entry.update(
        {
            "tensorrt": version,
            "sm": sm,
            "gpu": gpu,
            "opt_level": plan.opt_level,
            "limits": plan.to_dict()["limits"],
            "batch_inputs": list(build.batch_inputs),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    manifest.setdefault("engines", {})[build.engine.filename] = entry
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
