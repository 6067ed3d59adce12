"""The component trainers (VAE, vocoder, CLAP + T5) learn: a few steps of the shared loop on tiny data lower
their loss on a fixed batch, and each exports a directory its library's loader reads back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxmusic.audio import MelConfig, log_mel
from fluxmusic.data.synth import synth_clip
from fluxmusic.training.audio_data import CaptionMelDataset, ClipBank, MelCropDataset, WaveMelCropDataset
from fluxmusic.training.caption_tokenizer import build_caption_tokenizer
from fluxmusic.training.config import TrainConfig
from fluxmusic.training.loop import train
from fluxmusic.training.text_task import TextEncodersConfig, TextEncodersTask
from fluxmusic.training.vae_task import VAEConfig, VAETask
from fluxmusic.training.vocoder_task import VocoderConfig, VocoderTask

SECONDS = 10.24  # 1024 mel frames: the CLAP audio tower's input geometry


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bank() -> ClipBank:
    clips = [synth_clip(i, seconds=SECONDS) for i in range(4)]
    waves = torch.from_numpy(np.stack([c[0] for c in clips]))
    return ClipBank(waves, log_mel(waves), [c[2] for c in clips], [c[1] for c in clips], MelConfig())


def _loss_drops(task, steps: int, lr: float, tmp_path) -> tuple[float, float, object]:
    """(loss of the initial model, loss after training) on the same batch, and the TrainResult."""
    cfg = TrainConfig(steps=steps, batch_size=4, lr=lr, ema_decay=0.0, ema_every=1, log_every=steps,
                      ckpt_every=0, device="cpu")
    torch.manual_seed(cfg.seed)  # the loop seeds the same way before build_model: same initial weights
    initial = task.build_model()
    batch = task.collate([task.train_dataset()[i] for i in range(4)])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = float(task.validate(initial, batch, g)[0])
    result = train(task, cfg, tmp_path / "run", stream=open("/dev/null", "w"))  # noqa: SIM115
    with torch.no_grad():
        after = float(task.validate(result.model, batch, torch.Generator().manual_seed(0))[0])
    return before, after, result


def test_vae_steps_lower_loss_and_export_scaling(bank, tmp_path):
    from diffusers import AutoencoderKL

    task = VAETask(MelCropDataset(bank, 64), config=VAEConfig(channels=(8, 8, 8), norm_groups=4))
    before, after, result = _loss_drops(task, 12, 3e-3, tmp_path)
    assert after < 0.8 * before
    vae = AutoencoderKL.from_pretrained(str(result.export))
    assert vae.config.latent_channels == 8 and len(vae.config.block_out_channels) == 3
    with torch.no_grad():
        z = vae.encode(bank.mels[:, None]).latent_dist.mode() * vae.config.scaling_factor
    assert z.shape == (4, 8, 1024 // 4, 64 // 4)
    assert 0.5 < float(z.std()) < 2.0  # scaling factor set from the latent std


def test_vocoder_steps_lower_loss(bank, tmp_path):
    from transformers import SpeechT5HifiGan

    cfg = VocoderConfig(initial_channels=32, resblock_kernels=(3,), resblock_dilations=((1,),))
    task = VocoderTask(WaveMelCropDataset(bank, 16), config=cfg)
    before, after, result = _loss_drops(task, 10, 2e-3, tmp_path)
    assert after < before
    voc = SpeechT5HifiGan.from_pretrained(str(result.export))
    assert voc(bank.mels[:1, :10]).shape[-1] >= 10 * 160 - 16


def test_text_encoders_steps_lower_contrastive_loss(bank, tmp_path):
    from fluxmusic.components import load_clap_text, load_t5

    t5_tok = build_caption_tokenizer(bank.captions, tmp_path / "tok", "t5", 64)
    clap_tok = build_caption_tokenizer(bank.captions, tmp_path / "ctok", "clap", 64)
    assert clap_tok(["a piano"])["input_ids"][0][0] == clap_tok.bos_token_id
    assert t5_tok(["a piano"])["input_ids"][0][-1] == t5_tok.eos_token_id
    cfg = TextEncodersConfig(t5_d_model=32, t5_heads=2, t5_layers=1, clap_hidden=32, clap_layers=1, clap_heads=2,
                             projection_dim=16, audio_patch_hidden=16, audio_depths=(1, 1), audio_heads=(1, 2))
    task = TextEncodersTask(CaptionMelDataset(bank), t5_tok, clap_tok, 48, 48, config=cfg)
    before, after, result = _loss_drops(task, 12, 3e-3, tmp_path)
    assert after < before
    # Exported in the model directory's layout, read back by the strict loaders.
    assert load_clap_text(result.export / "clap").config.hidden_size == 32
    assert load_t5(result.export / "text_encoder").config.d_model == 32
