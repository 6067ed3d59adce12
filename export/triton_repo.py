"""Generate a Triton Inference Server model repository from a model directory and its exported components.

```
REPO/
  t5/ clap/ transformer/ vae_decoder/ vocoder/     config.pbtxt + 1/model.onnx (or 1/model.plan)
  vae_encoder/                                     optional (export onnx --encoder): audio in
  image_encoder/ image_adapter/ story_adapter/     optional (a model directory with adapters/): image / story
  fluxmusic/                                       the Python-backend BLS model
    config.pbtxt
    1/model.py                                     wraps fluxmusic.runtime.triton_bls
    1/model_index.json  1/null_embeddings.safetensors  1/transformer_config.json
    1/tokenizer/  1/clap_tokenizer/
    1/adapters/config.json  1/image_processor/  1/image_encoder_config.json     with the image / story models
    1/components.json                              each component's platform and graph I/O (for --check)
```
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fluxmusic.export.spec import COMPONENT_NAMES, ENCODER_NAME, MEDIA_NAMES
from fluxmusic.export.triton_config import (
    INSTANCE_KINDS,
    MODEL_FILES,
    PLATFORMS,
    GraphIO,
    external_data_files,
    onnx_graph_io,
    parse_config,
    render_bls_config,
    render_component_config,
    templates_dir,
)

from fluxmusic.checkpoint import atomic_write_text
from fluxmusic.errors import FluxMusicError
from fluxmusic.modeldir import INDEX, NULL_EMBEDDINGS, read_index
from fluxmusic.tempfiles import publish

BLS_MODEL = "fluxmusic"
VERSION = "1"
COMPONENTS_FILE = "components.json"


@dataclass(frozen=True)
class RepoOptions:
    """Serving knobs of the generated configs."""

    max_batch_size: int = 8  # for the batchable components; the BLS sends at most 2 items (cond + uncond)
    instance_count: int = 1  # instances per component model
    instance_kind: str | None = None  # default: KIND_GPU for TensorRT plans, KIND_AUTO (GPU if any) for ONNX
    bls_instance_count: int = 1  # concurrent generations; each holds one request through its whole solve
    decoupled: bool = False  # stream per-step progress responses before the audio
    max_queue_delay_us: int = 1000
    #: the image / story models (image tower + adapters, ONNX): None = when the model directory has adapters/
    media: bool | None = None

    def check(self) -> None:
        for name in ("max_batch_size", "instance_count", "bls_instance_count"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FluxMusicError(f"{name.replace('_', ' ')} {v!r} must be an integer >= 1")
        if self.max_queue_delay_us < 0:
            raise FluxMusicError(f"max queue delay {self.max_queue_delay_us!r} us must be >= 0")
        if self.instance_kind is not None and self.instance_kind not in INSTANCE_KINDS:
            raise FluxMusicError(
                f"instance kind {self.instance_kind!r} is not allowed; allowed: {', '.join(INSTANCE_KINDS)}"
            )


def engine_path(engines_dir: Path, component: str, precision: str | None = None) -> Path | None:
    """A component's TensorRT engine in ``engines_dir``: ``<component>.plan``, or one named by
    ``fluxmusic export tensorrt`` (``transformer.trt10.8.fp16.sm89.plan``). Triton loads it as is, so the engine
    must come from the server's TensorRT version and GPU; with several candidates, ``precision`` picks one.
    """
    from fluxmusic.export.tensorrt_plan import parse_engine_filename

    plain = engines_dir / f"{component}.plan"
    named = [
        (n, p)
        for p in sorted(engines_dir.glob(f"{component}.*.plan"))
        if (n := parse_engine_filename(p.name)) is not None and n.component == component
    ]
    found = [p for n, p in named if precision is None or n.precision == precision]
    if plain.is_file() and (precision is None or not found):  # a plain name carries no precision to filter on
        found.append(plain)
    if len(found) > 1:
        raise FluxMusicError(
            f"{engines_dir} has several {component} engines ({', '.join(p.name for p in found)}); "
            "choose one with --engine-precision, or keep only the engines built for the server's GPU"
        )
    return found[0] if found else None


def build_repository(
    model_dir: str | Path,
    onnx_dir: str | Path,
    out: str | Path,
    engines_dir: str | Path | None = None,
    options: RepoOptions | None = None,
    engine_precision: str | None = None,
) -> Path:
    """Write the repository to a temporary sibling, check it (``check_repository``), then rename it into place."""
    from fluxmusic.export.triton_check import check_repository

    options = options or RepoOptions()
    options.check()
    model_dir, onnx_dir, out = Path(model_dir), Path(onnx_dir), Path(out)
    read_index(model_dir)  # a complete model directory, or a clear error
    media = _wants_media(model_dir, options.media)
    if not onnx_dir.is_dir():
        raise FluxMusicError(f"ONNX directory {onnx_dir} does not exist (make it with `fluxmusic export onnx`)")
    _check_same_model(model_dir, onnx_dir)
    names = list(COMPONENT_NAMES)
    if engines_dir is None and (onnx_dir / f"{ENCODER_NAME}.onnx").is_file():
        # the optional VAE encoder (``export onnx --encoder``): audio in, servable on its own (log-mel -> latent)
        names.append(ENCODER_NAME)
    sources = {c: onnx_dir / f"{c}.onnx" for c in names}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    engines: dict[str, Path] = {}
    if engines_dir is not None:
        engines_dir = Path(engines_dir)
        if not engines_dir.is_dir():
            raise FluxMusicError(f"engines directory {engines_dir} does not exist")
        for c in COMPONENT_NAMES:
            path = engine_path(engines_dir, c, engine_precision)
            if path is None:
                missing.append(f"{c} engine in {engines_dir} ({c}.plan or {c}.trt<version>.<precision>.sm<cc>.plan)")
            else:
                engines[c] = path
    if missing:
        raise FluxMusicError(f"missing exported component(s): {', '.join(missing)}")
    if out.exists():
        raise FluxMusicError(f"output repository {out} already exists; choose a new path")

    templates = templates_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        if media:
            sources.update(_media_sources(model_dir, onnx_dir, tmp))
            names += list(MEDIA_NAMES)
        components = {}
        for c in names:
            io = onnx_graph_io(sources[c])
            on_engine = engines_dir is not None and c in engines  # the image / story graphs stay ONNX
            platform = PLATFORMS["plan" if on_engine else "onnx"]
            kind = options.instance_kind or ("KIND_GPU" if on_engine else "KIND_AUTO")
            text = render_component_config(
                c,
                io,
                platform,
                options.max_batch_size,
                kind,
                options.instance_count,
                options.max_queue_delay_us,
                templates,
            )
            parse_config(text, f"generated config of {c}")
            version = tmp / c / VERSION
            version.mkdir(parents=True)
            if on_engine:
                shutil.copy2(engines[c], version / MODEL_FILES[platform])
            else:
                _copy_onnx(sources[c], version / MODEL_FILES[platform])
            atomic_write_text(tmp / c / "config.pbtxt", text)
            source = engines[c].name if on_engine else sources[c].name
            components[c] = {"platform": platform, "source": source, "onnx": sources[c].name, "graph": io.to_json()}
        shutil.rmtree(tmp / _MEDIA_EXPORT, ignore_errors=True)  # graphs exported here are copied into models
        _write_bls_model(tmp, model_dir, components, options, templates, media)
        check_repository(tmp)
        publish(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


#: Where the image / story graphs are exported when the ONNX directory has none (inside the temporary repository).
_MEDIA_EXPORT = ".media-export"


def _wants_media(model_dir: Path, media: bool | None) -> bool:
    """Whether the repository gets the image / story models: asked for, or (None) the model directory has them."""
    from fluxmusic.adapters import check_media_dirs, has_media

    check_media_dirs(model_dir)
    if media is None:
        return has_media(model_dir)
    if media and not has_media(model_dir):
        raise FluxMusicError(f"model directory {model_dir} has no image / story adapters (adapters/, image_encoder/, "
                             "image_processor/); build the repository without --media")
    return media


def _media_sources(model_dir: Path, onnx_dir: Path, tmp: Path) -> dict[str, Path]:
    """The image / story graphs: ``ONNX/media/`` of ``fluxmusic export onnx --media`` when present (checked
    against its manifest's hashes), otherwise exported now from the model directory (parity-checked there)."""
    from fluxmusic.export.media_onnx import MANIFEST, MEDIA_DIR, export_media
    from fluxmusic.export.onnx_export import sha256_file

    media_dir = onnx_dir / MEDIA_DIR
    if (media_dir / MANIFEST).is_file():
        graphs = json.loads((media_dir / MANIFEST).read_text()).get("graphs", {})
        out = {}
        for name in MEDIA_NAMES:
            g = graphs.get(name)
            path = media_dir / (g or {}).get("file", f"{name}.onnx")
            if g is None or not path.is_file():
                raise FluxMusicError(f"{media_dir} lacks the {name} graph; re-export with `fluxmusic export onnx "
                                     "--media`")
            if sha256_file(path) != g.get("sha256"):
                raise FluxMusicError(f"{path} does not match the hash in {media_dir / MANIFEST} (changed after "
                                     "export); re-export with `fluxmusic export onnx --media`")
            out[name] = path
        return out
    export_media(model_dir, tmp / _MEDIA_EXPORT)
    return {name: tmp / _MEDIA_EXPORT / MEDIA_DIR / f"{name}.onnx" for name in MEDIA_NAMES}


def _check_same_model(model_dir: Path, onnx_dir: Path) -> None:
    """The BLS model takes tokenizers and null embeddings from ``model_dir``: refuse graphs exported from another
    model (the exporter's manifest records hashes of each component's config and files)."""
    from fluxmusic.export.onnx_export import MANIFEST, check_manifest_matches, read_manifest

    if (onnx_dir / MANIFEST).is_file():  # hand-made exports have none; their widths are still checked later
        check_manifest_matches(model_dir, read_manifest(onnx_dir), COMPONENT_NAMES, weights=True)


def _copy_onnx(src: Path, dst: Path) -> None:
    """Copy a graph as model.onnx with its external-data files, whose names the graph references as they are."""
    shutil.copy2(src, dst)
    for name in external_data_files(src):
        data = src.parent / name
        if not data.is_file():
            raise FluxMusicError(f"{src} references external data {name}, which is not next to it")
        shutil.copy2(data, dst.parent / name)


def _write_bls_model(
    repo: Path, model_dir: Path, components: dict, options: RepoOptions, templates: Path, media: bool = False
) -> None:
    from fluxmusic.export.bls_contract import (
        ADAPTERS_DIR,
        CLAP_TOKENIZER_DIR,
        IMAGE_ENCODER_CONFIG,
        IMAGE_PROCESSOR_DIR,
        PROBE_WEIGHTS,
        TOKENIZER_DIR,
        TRANSFORMER_CONFIG,
    )

    from fluxmusic.adapters import ADAPTERS, IMAGE_ENCODER, IMAGE_PROCESSOR
    from fluxmusic.step_cache import write_probe_weights

    version = repo / BLS_MODEL / VERSION
    version.mkdir(parents=True)
    text = render_bls_config(BLS_MODEL, options.bls_instance_count, options.decoupled, templates)
    parse_config(text, "generated config of the BLS model")
    atomic_write_text(repo / BLS_MODEL / "config.pbtxt", text)
    shutil.copy2(templates / BLS_MODEL / VERSION / "model.py", version / "model.py")
    for name in (INDEX, NULL_EMBEDDINGS):
        shutil.copy2(model_dir / name, version / name)
    shutil.copy2(model_dir / "transformer" / "config.json", version / TRANSFORMER_CONFIG)
    write_probe_weights(model_dir / "transformer", version / PROBE_WEIGHTS)  # step caching's few weights
    shutil.copytree(model_dir / "tokenizer", version / TOKENIZER_DIR)
    shutil.copytree(model_dir / "clap_tokenizer", version / CLAP_TOKENIZER_DIR)
    if media:  # the configs the BLS needs besides the graphs: chunking, preprocessing, the tower's sizes
        (version / ADAPTERS_DIR).mkdir()
        shutil.copy2(model_dir / ADAPTERS / "config.json", version / ADAPTERS_DIR / "config.json")
        shutil.copytree(model_dir / IMAGE_PROCESSOR, version / IMAGE_PROCESSOR_DIR)
        shutil.copy2(model_dir / IMAGE_ENCODER / "config.json", version / IMAGE_ENCODER_CONFIG)
    atomic_write_text(version / COMPONENTS_FILE, json.dumps({"components": components}, indent=2) + "\n")


def read_components(repo: Path) -> dict[str, tuple[str, GraphIO]]:
    """component -> (platform, graph I/O recorded at generation time)."""
    path = repo / BLS_MODEL / VERSION / COMPONENTS_FILE
    if not path.is_file():
        raise FluxMusicError(f"{repo} is not a fluxmusic Triton repository: it has no {path.relative_to(repo)}")
    data = json.loads(path.read_text())["components"]
    return {c: (d["platform"], GraphIO.from_json(d["graph"])) for c, d in data.items()}
