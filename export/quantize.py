"""int8 dynamic quantisation of the exported transformer for CPU (``transformer.int8.onnx``).

Weights of MatMul/Gemm become int8 (per output channel), activations are quantised per call (dynamic), so no
calibration data is needed. It is a CPU variant: ``validate`` reports it against torch fp32 like any other.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from fluxmusic.errors import FluxMusicError
from fluxmusic.tempfiles import publish

INT8 = "int8"


def quantize_file(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantisation of one ONNX file (external data kept for large models), written atomically."""
    import onnx
    from fluxmusic.export.onnx_export import META_PREFIX, assert_no_float64
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmpdir = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.stem}."))
    try:
        tmp = tmpdir / dst.name
        large = src.with_name(src.name + ".data").exists()
        # The quantiser re-infers shapes and trips over the exporter's value_info; give it a graph without.
        plain = onnx.load(str(src))
        del plain.graph.value_info[:]
        src_plain = tmpdir / f"plain.{src.name}"
        onnx.save_model(plain, str(src_plain), save_as_external_data=large, location=src_plain.name + ".data")
        del plain
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # onnxruntime.quantization logs advice on the root logger
        try:
            quantize_dynamic(
                str(src_plain),
                str(tmp),
                op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=True,
                weight_type=QuantType.QInt8,
                use_external_data_format=large,
            )
        finally:
            quiet.setLevel(level)
        proto = onnx.load(str(tmp), load_external_data=False)
        meta = {p.key: p.value for p in proto.metadata_props}
        meta[META_PREFIX + "variant"] = INT8
        meta[META_PREFIX + "quantization"] = "onnxruntime quantize_dynamic, MatMul/Gemm weights int8 per-channel"
        del proto.metadata_props[:]
        for k, v in meta.items():
            e = proto.metadata_props.add()
            e.key, e.value = k, v
        onnx.save_model(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
        assert_no_float64(tmp)
        for f in tmpdir.iterdir():
            if f.name != dst.name and not f.name.startswith("plain."):
                os.replace(f, dst.parent / f.name)
        publish(tmp)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return dst


def quantize_transformer(onnx_dir: str | Path, component: str = "transformer") -> Path:
    """``<component>.onnx`` -> ``<component>.int8.onnx`` in ``onnx_dir``; records it in the manifest."""
    from fluxmusic.export.onnx_export import MANIFEST, _file_entry, graph_filename, read_manifest

    onnx_dir = Path(onnx_dir)
    manifest = read_manifest(onnx_dir)
    src = onnx_dir / graph_filename(component)
    if component not in manifest["components"] or not src.is_file():
        raise FluxMusicError(f"{onnx_dir} has no {src.name} to quantise; export it first (--components {component})")
    dst = onnx_dir / graph_filename(component, INT8)
    quantize_file(src, dst)
    manifest["components"][component].setdefault("variants", {})[INT8] = _file_entry(onnx_dir, dst.name)
    from fluxmusic.checkpoint import atomic_write_text

    atomic_write_text(onnx_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return dst
