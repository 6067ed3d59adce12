"""Triton Python-backend model ``fluxmusic``: a thin wrapper of ``fluxmusic.runtime.triton_bls``.

The generation logic (tokenization, null embeddings, seeded noise, Euler CFG loop, decoding) lives in that
plain module and is tested there with onnxruntime standing in for the component models; this file only maps
Triton requests, responses, errors and BLS calls onto it. Needs ``fluxmusic`` installed in the server's Python.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from fluxmusic.runtime.triton_bls import BLS_INPUTS, FluxMusicBls, progress_tensors, read_version_dir

from fluxmusic.errors import FluxMusicError


class Cancelled(Exception):
    """The client cancelled the request: stop the solve at the next step."""


def _infer(outputs: dict[str, list[str]], model_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One BLS call of a component model, requesting all its outputs."""
    request = pb_utils.InferenceRequest(
        model_name=model_name,
        requested_output_names=outputs[model_name],
        inputs=[pb_utils.Tensor(name, array) for name, array in inputs.items()],
    )
    response = request.exec()
    if response.has_error():
        raise RuntimeError(f"model {model_name!r} failed: {response.error().message()}")
    return {t.name(): _numpy(t) for t in response.output_tensors()}


def _numpy(tensor) -> np.ndarray:
    """A BLS output may sit in GPU memory (GPU instances of the component models): copy it to the host."""
    if tensor.is_cpu():
        return tensor.as_numpy()
    from torch.utils.dlpack import from_dlpack

    return from_dlpack(tensor.to_dlpack()).cpu().numpy()


def _error(message: str, invalid_argument: bool) -> pb_utils.TritonError:
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid_argument else "INTERNAL", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def _response(tensors: dict[str, np.ndarray]) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        _, _, specs = read_version_dir(version_dir)
        outputs = {name: [t.name for t in spec.outputs] for name, spec in specs.items()}
        self.bls = FluxMusicBls(version_dir, partial(_infer, outputs))

    def _inputs(self, request) -> dict[str, np.ndarray | None]:
        tensors = {t.name: pb_utils.get_input_tensor_by_name(request, t.name) for t in BLS_INPUTS}
        return {k: (None if t is None else t.as_numpy()) for k, t in tensors.items()}

    def _generate(self, request, progress=None, prepared=None, on_window=None) -> pb_utils.InferenceResponse:
        try:
            if prepared is None:
                prepared = self.bls.prepare(self._inputs(request))
            return _response(self.bls.run(prepared, progress, on_window))
        except FluxMusicError as e:  # a bad input: the message names it
            return pb_utils.InferenceResponse(error=_error(str(e), invalid_argument=True))
        except Cancelled:
            return pb_utils.InferenceResponse(error=_error("request cancelled", invalid_argument=False))
        except Exception as e:  # noqa: BLE001 - any other failure is returned, the server keeps serving
            return pb_utils.InferenceResponse(error=_error(f"generation failed: {e}", invalid_argument=False))

    def execute(self, requests):
        if not self.decoupled:
            return [self._generate(r) for r in requests]
        for request in requests:
            sender = request.get_response_sender()

            def progress(step: int, total: int, request=request, sender=sender) -> None:
                if getattr(request, "is_cancelled", lambda: False)():
                    raise Cancelled
                sender.send(_response(progress_tensors(step, total)))

            def on_window(tensors, sender=sender) -> None:  # long form: each finished window's audio, now
                sender.send(_response(tensors))

            try:
                prepared = self.bls.prepare(self._inputs(request))  # every check, before any progress is streamed
            except FluxMusicError as e:
                sender.send(
                    pb_utils.InferenceResponse(error=_error(str(e), invalid_argument=True)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
                continue
            sender.send(self._generate(request, progress, prepared, on_window),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
