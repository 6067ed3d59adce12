"""Audio and text embedders for the metrics. One implementation: a transformers ``ClapModel`` (both towers).

Two audio front-ends, chosen by what the checkpoint directory provides:

* ``preprocessor_config.json`` present (a published checkpoint such as laion/larger_clap_music): its
  ``ClapFeatureExtractor`` on the waveform resampled to the extractor's rate;
* otherwise (the bundled default, tiny test models): the model's own log-mel (``fluxmusic.audio.log_mel``)
  average-pooled to the audio tower's input grid. For the default's CLAP (HTSAT grid 256 x 16) that is 4 x 4
  pooling of the 1024 x 64 mel, exactly the input it was trained on (``fluxmusic.training.text_task``).

The pluggable interface is :class:`Embedder`; anything with the same methods can be passed to the evaluator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fluxmusic.audio import MelConfig, log_mel, resample
from fluxmusic.errors import FluxMusicError


class Embedder(Protocol):
    name: str

    def embed_audio(self, waves: Sequence[np.ndarray], sr: int) -> np.ndarray: ...  # [N, D], unit rows
    def embed_text(self, texts: Sequence[str]) -> np.ndarray: ...  # [N, D], unit rows, same space
    def logit_scale(self) -> float: ...


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


class ClapEmbedder:
    """Unit-norm projected embeddings of a full ``ClapModel`` (text and audio towers) on the CPU."""

    def __init__(self, clap_dir: str | Path, tokenizer_dir: str | Path | None = None, max_length: int = 77,
                 mel: MelConfig | None = None, batch_size: int = 8) -> None:
        from transformers import ClapModel

        from fluxmusic.components import _from_pretrained, load_tokenizer, read_config

        clap_dir = Path(clap_dir)
        cfg = read_config(clap_dir, "CLAP embedder")
        if cfg.get("model_type") != "clap":
            raise FluxMusicError(
                f"embedder {clap_dir} has model_type {cfg.get('model_type')!r}; a full ClapModel ('clap') with "
                "an audio tower is needed"
            )
        self.name = f"clap:{clap_dir}"
        self.model = _from_pretrained(ClapModel, clap_dir, "CLAP embedder")
        tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else clap_dir
        if not _has_tokenizer(tok_dir):
            raise FluxMusicError(f"no CLAP tokenizer in {tok_dir}; pass the tokenizer directory")
        self.tokenizer = load_tokenizer(tok_dir, "CLAP tokenizer")
        self.max_length = max_length
        self.batch_size = batch_size
        self.mel = mel or MelConfig()
        self.feature_extractor = None
        if (clap_dir / "preprocessor_config.json").is_file():
            from transformers import ClapFeatureExtractor

            self.feature_extractor = ClapFeatureExtractor.from_pretrained(str(clap_dir))
        acfg = self.model.config.audio_config
        width = acfg.patch_embeds_hidden_size * 2 ** (len(acfg.depths) - 1)
        if width != acfg.hidden_size:
            # HTSAT's last stage is this wide; audio_projection expects hidden_size (a mis-built tower).
            raise FluxMusicError(
                f"CLAP audio tower in {clap_dir} is inconsistent: its last stage is {width} wide but hidden_size is "
                f"{acfg.hidden_size}; it cannot embed audio"
            )
        self.freq_ratio = acfg.spec_size // acfg.num_mel_bins  # HTSAT folds time into a square image
        self.grid = (acfg.spec_size * self.freq_ratio, acfg.num_mel_bins)  # (time, freq) the tower takes

    def logit_scale(self) -> float:
        # The text-side temperature is the one the contrastive loss trained for text -> audio scores.
        return float(self.model.logit_scale_t.detach().exp().clamp(max=100))

    def _audio_inputs(self, waves: Sequence[np.ndarray], sr: int) -> dict[str, torch.Tensor]:
        if self.feature_extractor is not None:
            fe = self.feature_extractor
            waves = [resample(np.asarray(w, np.float32), sr, fe.sampling_rate) for w in waves]
            out = fe(waves, sampling_rate=fe.sampling_rate, return_tensors="pt")
            return {"input_features": out["input_features"], "is_longer": out.get("is_longer")}
        if sr != self.mel.sample_rate:
            waves = [resample(np.asarray(w, np.float32), sr, self.mel.sample_rate) for w in waves]
        n = max(len(w) for w in waves)
        batch = torch.zeros(len(waves), n)
        for i, w in enumerate(waves):
            batch[i, : len(w)] = torch.as_tensor(np.asarray(w, np.float32))
        mel = log_mel(batch, self.mel)  # [B, frames, n_mels]
        t, f = self.grid
        if mel.shape[2] % f:
            raise FluxMusicError(f"embedder takes {f} mel bins; {self.mel.n_mels} model mel bins do not pool to it")
        pool = (max(1, math.ceil(mel.shape[1] / t)), mel.shape[2] // f)
        return {"input_features": F.avg_pool2d(mel[:, None], pool)}

    @torch.no_grad()
    def embed_audio(self, waves: Sequence[np.ndarray], sr: int) -> np.ndarray:
        out = []
        for i in range(0, len(waves), self.batch_size):
            inputs = self._audio_inputs(waves[i : i + self.batch_size], sr)
            pooled = self.model.audio_model(**{k: v for k, v in inputs.items() if v is not None}).pooler_output
            out.append(F.normalize(self.model.audio_projection(pooled), dim=-1))
        return torch.cat(out).numpy().astype(np.float64)

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i : i + self.batch_size]), max_length=self.max_length,
                                 padding="max_length", truncation=True, return_tensors="pt")
            pooled = self.model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            out.append(F.normalize(self.model.text_projection(pooled.pooler_output), dim=-1))
        return torch.cat(out).numpy().astype(np.float64)


def model_dir_embedder(model_dir: str | Path, embedder_dir: str | Path | None = None) -> ClapEmbedder:
    """The embedder for an evaluation: ``embedder_dir`` when given (its own tokenizer), else the model
    directory's CLAP (audio tower kept by the default-model recipe) with its ``clap_tokenizer``."""
    from fluxmusic.modeldir import read_index

    model_dir = Path(model_dir)
    index = read_index(model_dir)
    geo = index.geometry
    mel = MelConfig(sample_rate=geo.sample_rate, hop_length=geo.hop_length, n_mels=geo.mel_bins)
    if embedder_dir is not None:
        d = Path(embedder_dir)
        if not d.is_dir():
            raise FluxMusicError(f"embedder directory {d} does not exist")
        return ClapEmbedder(d, None, 77, mel)
    return ClapEmbedder(model_dir / "clap", model_dir / "clap_tokenizer", index.clap_max_length, mel)


def class_prototypes(embedder: Embedder, classes: dict[str, Sequence[str]], template: str = "{}") -> np.ndarray:
    """Unit text prototype per class [K, D]: the mean of its phrases' embeddings (in ``template``), renormalised."""
    protos = []
    for phrases in classes.values():
        e = embedder.embed_text([template.format(p) for p in phrases]).mean(0)
        protos.append(e / max(np.linalg.norm(e), 1e-12))
    return np.stack(protos)


def zero_shot_probs(embedder: Embedder, audio_emb: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Per-clip class distributions [N, K]: softmax of the CLAP-scaled cosines to the class prototypes."""
    logits = embedder.logit_scale() * audio_emb @ prototypes.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)
