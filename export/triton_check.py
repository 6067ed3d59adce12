"""Validate a generated Triton repository without a server.

Three agreements are checked for every model: its ``config.pbtxt`` parses with Triton's ``ModelConfig``
protobuf schema; a component's tensor names, types and dims equal its graph's (the ONNX file in the repository,
or for TensorRT plans the ONNX I/O recorded when the repository was generated); and every tensor the BLS model
sends or reads (the export contract in ``fluxmusic.export.spec``, at the model directory's text lengths) is
accepted by the component's config. The BLS model's own config must equal ``BLS_INPUTS``/``BLS_OUTPUTS``.
"""

from __future__ import annotations

from pathlib import Path

from fluxmusic.export.spec import COMPONENT_NAMES, ENCODER_NAME, MEDIA_NAMES, ComponentSpec
from fluxmusic.export.triton_config import (
    MODEL_FILES,
    NUMPY_TO_TRITON,
    GraphIO,
    data_type_name,
    onnx_graph_io,
    parse_config,
)
from fluxmusic.export.triton_repo import BLS_MODEL, VERSION, read_components

from fluxmusic.errors import FluxMusicError

#: Items per request the BLS sends to each component (cond and uncond go to the transformer together).
BLS_BATCH = {"t5": 1, "clap": 1, "transformer": 2, "vae_decoder": 1, "vocoder": 1, "vae_encoder": 1,
             "image_encoder": 1, "image_adapter": 1, "story_adapter": 1}


def check_repository(repo: str | Path) -> list[str]:
    """Run every check; raise one FluxMusicError listing all problems, or return what was checked."""
    repo = Path(repo)
    if not repo.is_dir():
        raise FluxMusicError(f"Triton repository {repo} does not exist")
    problems: list[str] = []
    configs = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        try:
            cfg = parse_config(path.read_text(), str(path.relative_to(repo)))
        except FluxMusicError as e:
            problems.append(str(e))
            continue
        if cfg.name != path.parent.name:
            problems.append(f"{path.parent.name}/config.pbtxt: name {cfg.name!r} differs from its directory")
        configs[path.parent.name] = cfg
    missing = [
        m for m in (*COMPONENT_NAMES, BLS_MODEL) if m not in configs and not (repo / m / "config.pbtxt").is_file()
    ]
    if missing:
        problems.append(f"missing model(s): {', '.join(missing)}")
    checked = [f"{name}/config.pbtxt parses with Triton's ModelConfig schema" for name in configs]

    if BLS_MODEL in configs:
        problems += _check_bls_config(configs[BLS_MODEL], repo / BLS_MODEL / VERSION)
        specs, lengths = _bls_contract(repo / BLS_MODEL / VERSION, problems)
        recorded = read_components(repo)
    else:
        specs, lengths, recorded = None, {}, {}
    if specs is not None and MEDIA_NAMES[0] in specs:  # the version directory has the image / story configs
        lacking = [m for m in MEDIA_NAMES if m not in configs]
        if lacking:
            problems.append(f"{BLS_MODEL}/{VERSION} has the image / story configs but the repository lacks "
                            f"model(s) {', '.join(lacking)}")
    for name in (*COMPONENT_NAMES, ENCODER_NAME, *MEDIA_NAMES):
        if name not in configs:
            continue
        cfg = configs[name]
        graph = _component_graph(repo, name, cfg, recorded, problems)
        if graph is not None:
            problems += _check_against_graph(name, cfg, graph)
            checked.append(f"{name}: tensors agree with its graph")
        if specs is not None and name in specs:
            problems += _check_against_bls(name, cfg, specs[name], lengths)
            checked.append(f"{name}: accepts what the BLS model sends")
    if problems:
        raise FluxMusicError(f"Triton repository {repo} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return checked


def _tensors(entries) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (data_type_name(t.data_type), list(t.dims)) for t in entries}


def _component_graph(repo: Path, name: str, cfg, recorded: dict, problems: list[str]) -> GraphIO | None:
    model_file = MODEL_FILES.get(cfg.platform)
    if model_file is None:
        problems.append(f"{name}/config.pbtxt: platform {cfg.platform!r}; allowed: {', '.join(MODEL_FILES)}")
        return None
    path = repo / name / VERSION / model_file
    if not path.is_file():
        problems.append(f"{name}: model file {path.relative_to(repo)} is missing")
        return None
    if cfg.platform == "onnxruntime_onnx":
        return onnx_graph_io(path)
    if name not in recorded:
        problems.append(f"{name}: no recorded graph I/O for its TensorRT plan in {BLS_MODEL}/{VERSION}/components.json")
        return None
    return recorded[name][1]


def _check_against_graph(name: str, cfg, graph: GraphIO) -> list[str]:
    where = f"{name}/config.pbtxt"
    batched = cfg.max_batch_size > 0
    problems = []
    if batched and graph.batch_dim is None:
        problems.append(f"{where}: max_batch_size {cfg.max_batch_size} but the graph has no shared batch dimension")
    if cfg.HasField("dynamic_batching") and not batched:
        problems.append(f"{where}: dynamic_batching needs max_batch_size > 0")
    for kind, entries, tensors in (("input", cfg.input, graph.inputs), ("output", cfg.output, graph.outputs)):
        have = _tensors(entries)
        want = {t.name: t for t in tensors}
        for n in sorted(set(want) - set(have)):
            problems.append(f"{where}: graph {kind} {n!r} is missing from the config")
        for n in sorted(set(have) - set(want)):
            problems.append(f"{where}: {kind} {n!r} is not in the graph (graph {kind}s: {', '.join(want)})")
        for n in sorted(set(have) & set(want)):
            dtype, dims = have[n]
            t = want[n]
            if dtype != t.data_type:
                problems.append(f"{where}: {kind} {n!r} has data_type {dtype} but the graph has {t.data_type}")
            if dims != t.triton_dims(batched):
                problems.append(
                    f"{where}: {kind} {n!r} has dims {dims} but the graph has {t.triton_dims(batched)}"
                    + (" (batch dimension implicit)" if batched else "")
                )
    return problems


def _bls_contract(version_dir: Path, problems: list[str]) -> tuple[dict[str, ComponentSpec] | None, dict[str, int]]:
    from fluxmusic.export.bls_contract import read_version_dir

    try:
        index, _, specs = read_version_dir(version_dir)
    except FluxMusicError as e:
        problems.append(str(e))
        return None, {}
    # Lengths the BLS fixes by padding; every other symbolic dim varies per request.
    return specs, {"txt_len": index.t5_max_length, "clap_len": index.clap_max_length}


def _check_against_bls(name: str, cfg, spec: ComponentSpec, lengths: dict[str, int]) -> list[str]:
    where = f"{name}/config.pbtxt"
    batched = cfg.max_batch_size > 0
    problems = []
    if batched and BLS_BATCH[name] > cfg.max_batch_size:
        problems.append(f"{where}: max_batch_size {cfg.max_batch_size} < {BLS_BATCH[name]} items the BLS sends")
    for kind, entries, tensors in (("input", cfg.input, spec.inputs), ("output", cfg.output, spec.outputs)):
        have = _tensors(entries)
        for t in tensors:
            if t.name not in have:
                problems.append(
                    f"{where}: the BLS model {'sends' if kind == 'input' else 'reads'} {kind} {t.name!r}, "
                    f"which the config lacks"
                )
                continue
            dtype, dims = have[t.name]
            if dtype != NUMPY_TO_TRITON[t.dtype]:
                problems.append(f"{where}: {kind} {t.name!r} is {dtype}; the BLS model uses {NUMPY_TO_TRITON[t.dtype]}")
            shape = list(t.shape)
            if batched:
                if shape[0] != "batch":
                    problems.append(f"{where}: max_batch_size > 0 but the BLS sends {t.name!r} without a batch dim")
                    continue
                shape = shape[1:]
            if len(dims) != len(shape) or not all(_accepts(c, s, lengths) for c, s in zip(dims, shape)):
                sent = [lengths.get(s, -1) if isinstance(s, str) else s for s in shape]
                problems.append(f"{where}: {kind} {t.name!r} has dims {dims}; the BLS model uses {sent} (-1 = varies)")
    extra = {e.name for e in cfg.input if not e.optional} - {t.name for t in spec.inputs}
    for n in sorted(extra):
        problems.append(f"{where}: required input {n!r} is never sent by the BLS model")
    return problems


def _accepts(config_dim: int, spec_dim: int | str, lengths: dict[str, int]) -> bool:
    """Does a config dim accept every value the BLS sends for this spec dim?"""
    if config_dim == -1:
        return True
    if isinstance(spec_dim, int):
        return config_dim == spec_dim
    return lengths.get(spec_dim) == config_dim


def _check_bls_config(cfg, version_dir: Path) -> list[str]:
    from fluxmusic.export.bls_contract import BLS_INPUTS, BLS_OUTPUTS

    where = f"{BLS_MODEL}/config.pbtxt"
    problems = []
    if cfg.backend != "python":
        problems.append(f"{where}: backend {cfg.backend!r}; the BLS model needs 'python'")
    if cfg.max_batch_size != 0:
        problems.append(f"{where}: max_batch_size {cfg.max_batch_size}; the BLS model takes one generation per request")
    if not (version_dir / "model.py").is_file():
        problems.append(f"{BLS_MODEL}: {VERSION}/model.py is missing")
    for kind, entries, tensors in (("input", cfg.input, BLS_INPUTS), ("output", cfg.output, BLS_OUTPUTS)):
        have = {e.name: e for e in entries}
        for n in sorted(set(have) - {t.name for t in tensors}):
            problems.append(f"{where}: {kind} {n!r} is not in the BLS contract (fluxmusic.export.bls_contract)")
        for t in tensors:
            e = have.get(t.name)
            if e is None:
                problems.append(f"{where}: {kind} {t.name!r} ({t.data_type}) is missing")
                continue
            got = (data_type_name(e.data_type), tuple(e.dims), bool(e.optional) if kind == "input" else False)
            if got != (t.data_type, t.dims, t.optional):
                problems.append(
                    f"{where}: {kind} {t.name!r} is {got[0]} dims {list(got[1])} optional={got[2]}; "
                    f"the BLS code expects {t.data_type} dims {list(t.dims)} optional={t.optional}"
                )
    return problems
