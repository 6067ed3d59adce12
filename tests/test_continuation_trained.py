"""Trained masked conditioning (MusicFlow-style): the config flag, the zero-initialised context input (step 0 equals
the plain model), the training masks and loss, the fine-tune, and the sampler's choice of route."""

import json

import numpy as np
import pytest
import torch

from fluxmusic.config import CONFIGS, FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.model import FluxMusicTransformer, add_context_input, masked_context
from fluxmusic.training.transformer_task import masked_flow_loss, sample_frame_masks

SR = 16000


def _tiny_cfg(**kw) -> FluxMusicConfig:
    return FluxMusicConfig(in_channels=32, vec_in_dim=16, context_in_dim=24, hidden_size=32, num_heads=2, depth=1,
                           depth_single_blocks=1, axes_dim=(4, 6, 6), **kw)


def _inputs(b: int = 2, g: int = 0):
    gen = torch.Generator().manual_seed(g)
    model_x = torch.randn(b, 8, 32, generator=gen)
    return model_x, torch.rand(b, generator=gen), torch.randn(b, 5, 24, generator=gen), torch.randn(b, 16,
                                                                                                   generator=gen)


def test_config_flag_absent_is_off_and_round_trips():
    plain = _tiny_cfg()
    assert plain.context_channels == 0 and "context_channels" not in plain.to_dict()
    for cfg in CONFIGS.values():  # the official configs read and write exactly as before
        assert "context_channels" not in cfg.to_dict()
        assert FluxMusicConfig.from_dict(cfg.to_dict()) == cfg
    ctx = _tiny_cfg(context_channels=64)
    assert ctx.to_dict()["context_channels"] == 64 and FluxMusicConfig.from_dict(ctx.to_dict()) == ctx
    with pytest.raises(FluxMusicError, match=r"context_channels = 10 \(0: no context input, or 2 x in_channels = 64"):
        _tiny_cfg(context_channels=10)
    assert not FluxMusicTransformer(plain).takes_context and FluxMusicTransformer(ctx).takes_context


def test_step_zero_equals_the_plain_model_exactly_and_training_moves_it():
    torch.manual_seed(0)
    plain = FluxMusicTransformer(_tiny_cfg()).eval()
    ext = add_context_input(plain).eval()
    x, t, txt, y = _inputs()
    rope = plain.rope_for(txt.shape[1], 4, 2)
    mask = torch.zeros(2, 8, 1)
    mask[:, :3] = 1
    ctx = masked_context(torch.randn_like(x), mask)
    with torch.no_grad():
        ref = plain(x, t, txt, y, rope)
        assert torch.equal(ext(x, t, txt, y, rope, context=ctx), ref)
        assert torch.equal(ext(x, t, txt, y, rope), ref)
        ext.context_in.weight.add_(0.01)
        assert not torch.allclose(ext(x, t, txt, y, rope, context=ctx), ref)
    with pytest.raises(ValueError, match="no context input"):
        plain(x, t, txt, y, rope, context=ctx)
    with pytest.raises(ValueError, match="already"):
        add_context_input(ext)


def test_training_masks_mix_full_prefix_and_middle():
    m = sample_frame_masks(400, 40, torch.Generator().manual_seed(0))
    full = (m.sum(1) == 0).float().mean()
    prefix = ((m[:, 0] == 1) & (m[:, -1] == 0)).float().mean()
    middle = ((m[:, 0] == 1) & (m[:, -1] == 1)).float().mean()
    assert abs(full - 0.3) < 0.08 and abs(prefix - 0.4) < 0.08 and abs(middle - 0.3) < 0.08
    assert float(full + prefix + middle) == 1.0
    pre = m[(m[:, 0] == 1) & (m[:, -1] == 0)]
    assert torch.all(pre[:, :-1] >= pre[:, 1:])  # a prefix: ones, then zeros
    assert pre.sum(1).min() >= 4 and pre.sum(1).max() <= 36
    with pytest.raises(FluxMusicError, match="unknown mask kind 'suffix'"):
        sample_frame_masks(4, 10, torch.Generator().manual_seed(0), {"suffix": 1.0})


def test_masked_loss_counts_only_generated_frames():
    x0, noise = torch.randn(1, 6, 4), torch.randn(1, 6, 4)
    mask = torch.zeros(1, 6, 4)
    mask[:, :3] = 1
    target = noise - x0

    def model(x, t, c):
        out = target.clone()
        out[:, :3] += 5.0  # wrong only where the frames are known: not counted
        return out

    assert float(masked_flow_loss(model, x0, noise, torch.tensor([0.5]), mask)) == 0.0

    def model2(x, t, c):
        assert torch.equal(c[..., :4], x0 * mask) and torch.equal(c[..., 4:], mask)
        return target + 1.0

    assert float(masked_flow_loss(model2, x0, noise, torch.tensor([0.5]), mask)) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tiny_model_dir):
    """A tiny embedding cache on the tiny model's latent grid (train and val items)."""
    from fluxmusic.pipeline import FluxMusicPipeline
    from fluxmusic.training.cache import write_cache

    pipe = FluxMusicPipeline.from_pretrained(tiny_model_dir)
    geo = pipe.geometry
    cond = pipe.conditioning(["calm piano", "fast organ"])
    null = pipe.conditioning([""])
    g = torch.Generator().manual_seed(0)
    items = [{"latent": torch.randn(geo.latent_channels, geo.max_latent_frames, geo.latent_width, generator=g),
              "txt": cond.txt[i % 2], "y": cond.y[i % 2], "caption": "x", "split": "val" if i % 4 == 0 else "train"}
             for i in range(8)]
    return write_cache(tmp_path_factory.mktemp("cache") / "c", items, null_txt=null.txt[0], null_y=null.y[0])


def _masked_task(base, cache, context_lr=5e-3):
    from fluxmusic.training.transformer_task import MaskedFinetuneTask, cache_splits

    train_ds, val_ds = cache_splits(cache)
    return MaskedFinetuneTask(base, train_ds, train_ds.null_txt, train_ds.null_y, val=val_ds, context_lr=context_lr)


class _Stop(Exception):
    """Raised in the middle of a run: the process 'dies' after its checkpoint at step 3."""


def test_masked_stage_resumes_bit_exactly_with_its_own_context_lr(tiny_model_dir, tiny_cache, tmp_path,
                                                                  one_torch_thread):
    import io

    from fluxmusic.training.checkpointing import CHECKPOINT_NAME
    from fluxmusic.training.config import TrainConfig
    from fluxmusic.training.loop import LOG_NAME, train
    from fluxmusic.transformer_io import load_transformer, save_transformer

    base = tiny_model_dir / "transformer"
    cfg = TrainConfig(steps=6, batch_size=2, lr=1e-3, warmup_steps=1, schedule="cosine", min_lr_ratio=0.1,
                      ema_decay=0.9, ema_every=1, log_every=1, ckpt_every=3, seed=1, device="cpu", val_at_start=True)
    ref = train(_masked_task(base, tiny_cache), cfg, tmp_path / "ref", stream=io.StringIO())
    assert ref.step == 6 and ref.model.takes_context

    task, calls = _masked_task(base, tiny_cache), []
    real = task.loss

    def dying_loss(model, batch, g):
        if model.training:  # training steps, not the validation passes
            calls.append(1)
            if len(calls) == 4:
                raise _Stop
        return real(model, batch, g)

    task.loss = dying_loss
    with pytest.raises(_Stop):
        train(task, cfg, tmp_path / "run", stream=io.StringIO())
    assert torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=True)["step"] == 3
    train(_masked_task(base, tiny_cache), cfg, tmp_path / "run", resume=True, stream=io.StringIO())

    a = torch.load(tmp_path / "ref" / CHECKPOINT_NAME, weights_only=True)
    b = torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=True)
    assert a["step"] == b["step"] == 6 and a["data"] == b["data"]
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # Two param groups: the pretrained weights at the config's lr, the new context input at its own, both on the
    # same warmup + cosine (at the end: 0.1x)
    groups = a["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-3, 5e-3] and len(groups[1]["params"]) == 2
    assert groups[0]["lr"] == pytest.approx(1e-4) and groups[1]["lr"] == pytest.approx(5e-4)
    log = [json.loads(line) for line in (tmp_path / "ref" / LOG_NAME).read_text().splitlines()]
    assert [r["lr_groups"] for r in log if r["event"] == "train"][0] == pytest.approx([1e-3, 5e-3])
    assert [r["step"] for r in log if r["event"] == "val"] == [0, 6]  # the baseline, then the end
    assert float(a["model"]["context_in.weight"].abs().sum()) > 0  # the zero-initialised input was trained
    exported = load_transformer(ref.export)
    assert exported.config.context_channels == 2 * exported.config.in_channels

    # A checkpoint continues a fine-tune of exactly its base weights: a retrained base is refused.
    other = load_transformer(base)
    with torch.no_grad():
        other.img_in.bias.add_(0.01)
    save_transformer(other, tmp_path / "other")
    with pytest.raises(FluxMusicError, match="base_sha256"):
        train(_masked_task(tmp_path / "other", tiny_cache), cfg, tmp_path / "run", resume=True, stream=io.StringIO())
    # A transformer that already takes the context input (this fine-tune's export) is trained further as it is.
    again = _masked_task(ref.export, tiny_cache).build_model()
    assert again.config == exported.config
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in again.state_dict().items())
    with pytest.raises(FluxMusicError, match="context lr must be a finite number > 0, got 0"):
        _masked_task(base, tiny_cache, context_lr=0)


def test_finetune_cli_writes_a_new_transformer_directory(tiny_model_dir, tiny_cache, tmp_path, capsys,
                                                          one_torch_thread):
    from fluxmusic.training.masked_finetune import main
    from fluxmusic.transformer_io import load_transformer

    out = tmp_path / "tr"
    args = ["--transformer", str(tiny_model_dir / "transformer"), "--cache", str(tiny_cache), "--out", str(out),
            "--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--context-lr", "1e-2", "--device", "cpu"]
    assert main(args) == 0
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["steps"] == summary["planned_steps"] == 3 and summary["train_items"] == 6
    assert summary["val_items"] == 2 and [v[0] for v in summary["val_loss"]] == [0, 3]
    assert summary["context_lr"] == 1e-2 and summary["batch_size"] == 2
    model = load_transformer(out)
    assert model.takes_context and model.config.context_channels == 2 * model.config.in_channels
    assert float(model.context_in.weight.detach().abs().sum()) > 0
    assert not (tmp_path / "tr.partial").exists() and (tmp_path / "tr.run" / "checkpoint.pt").is_file()
    capsys.readouterr()
    assert main(args) == 2 and "exists; give a new directory" in capsys.readouterr().err
    # --minutes stops at the first step past the limit, with a checkpoint and the export of that step
    quick = tmp_path / "quick"
    assert main([*args[:5], str(quick), "--steps", "50", "--batch-size", "2", "--minutes", "1e-6"]) == 0
    summary = json.loads((quick / "finetune.json").read_text())
    assert summary["steps"] == 1 and summary["planned_steps"] == 50
    assert load_transformer(quick).takes_context


def test_sampler_uses_trained_conditioning_when_the_model_has_it(context_model_dir, tiny_pipe, monkeypatch,
                                                                 one_torch_thread):
    from fluxmusic.pipeline import FluxMusicPipeline

    pipe = FluxMusicPipeline.from_pretrained(context_model_dir)
    assert pipe.takes_context and not tiny_pipe.takes_context
    wave = (0.3 * np.sin(2 * np.pi * 220 * np.arange(3 * SR) / SR)).astype(np.float32)
    seen = []
    real = pipe.backend.velocity

    def spy(x, t, txt, y, rope, context=None):
        seen.append(None if context is None else tuple(context.shape))
        return real(x, t, txt, y, rope, context=context)

    monkeypatch.setattr(pipe.backend, "velocity", spy)
    auto = pipe("calm piano", audio=wave, keep="0:1", duration=2.56, seed=0)
    assert seen and all(s is not None and s[-1] == 2 * 32 and s[0] == 2 for s in seen)  # [cond; uncond] rows
    seen.clear()
    trained = pipe("calm piano", audio=wave, keep="0:1", duration=2.56, seed=0, conditioning="trained")
    np.testing.assert_array_equal(auto.audio[0], trained.audio[0])
    seen.clear()
    replace = pipe("calm piano", audio=wave, keep="0:1", duration=2.56, seed=0, conditioning="replace")
    assert seen and all(s is None for s in seen)
    assert not np.array_equal(replace.audio[0], trained.audio[0])
    seen.clear()
    pipe("calm piano", duration=2.56, seed=0)  # text-to-music: no context
    assert all(s is None for s in seen)
    seen.clear()
    long = pipe("calm piano", duration=12.0, overlap=2.56, seed=0)  # long form: windows after the first get context
    assert long.windows >= 2 and any(s is None for s in seen) and any(s is not None for s in seen)
    with pytest.raises(FluxMusicError, match="step caching"):
        pipe("calm piano", audio=wave, keep="0:1", duration=2.56, seed=0, cache_threshold=0.1)


def test_conditioning_option_errors(tiny_pipe):
    wave = np.zeros(SR, dtype=np.float32) + 0.1
    with pytest.raises(FluxMusicError, match="needs a transformer with trained masked conditioning"):
        tiny_pipe("calm piano", audio=wave, keep="0:0.5", duration=2.56, seed=0, conditioning="trained")
    with pytest.raises(FluxMusicError, match="conditioning 'soft'.*auto, trained, replace"):
        tiny_pipe.request("calm piano", audio=wave, keep="0:0.5", duration=2.56, conditioning="soft")
    with pytest.raises(FluxMusicError, match="given audio .* or long form only"):
        tiny_pipe.request("calm piano", conditioning="replace")


def test_cli_conditioning_flag(context_model_dir, tmp_path, capsys, one_torch_thread):
    import soundfile as sf

    from fluxmusic.cli import main

    wav = tmp_path / "in.wav"
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 220 * np.arange(2 * SR) / SR)).astype(np.float32), SR)
    base = ["generate", "calm piano", "--model", str(context_model_dir), "--audio", str(wav), "--keep", "0:1",
            "--duration", "2.56", "--seed", "0"]
    assert main(base + ["--conditioning", "replace", "-o", str(tmp_path / "a.wav")]) == 0
    assert main(base + ["--conditioning", "trained", "-o", str(tmp_path / "b.wav")]) == 0
    a, b = sf.read(tmp_path / "a.wav")[0], sf.read(tmp_path / "b.wav")[0]
    assert a.shape == b.shape and not np.array_equal(a, b)
    with pytest.raises(SystemExit) as e:
        main(base + ["--conditioning", "nope", "-o", str(tmp_path / "c.wav")])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_gpu_transformer_round_trip_pack_train_assemble(tiny_model_dir, tiny_cache, tmp_path, one_torch_thread):
    """benchmarks/gpu_transformer.py end to end on the CPU: the int8 pack unpacks to a readable cache within
    1 % of the original, both stages train within their budgets, and the shards assemble into a model
    directory that generates."""
    import importlib.util
    from pathlib import Path

    from fluxmusic.pipeline import FluxMusicPipeline
    from fluxmusic.training.cache import CachedEmbeddingDataset

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_transformer.py"
    spec = importlib.util.spec_from_file_location("gpu_transformer", path)
    gt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gt)

    packed = gt.pack(tiny_cache, tmp_path / "p.npz", tiny_model_dir / "transformer" / "config.json")
    assert packed["items"] == 8 and packed["latent_relative_rms_error"] < 0.01
    back, config = gt.unpack(tmp_path / "p.npz", tmp_path / "cache")
    a, b = CachedEmbeddingDataset(tiny_cache), CachedEmbeddingDataset(back)
    assert a.items_meta() == b.items_meta() and config == json.loads((tiny_model_dir / "transformer" /
                                                                      "config.json").read_text())
    for k in ("latent", "txt", "y"):
        x, y = a[3][k], b[3][k]
        assert float((x - y).norm() / x.norm()) < 0.01, k

    summary = gt.train_on_device(tmp_path / "p.npz", tmp_path / "out", 0.01, 0.01, 2, "cpu", tmp_path / "work",
                                 beat_minutes=0)
    assert [s["stage"] for s in summary["stages"]] == ["plain", "masked"]
    assert all(s["steps"] >= 1 for s in summary["stages"])
    assert sorted(p.name for p in (tmp_path / "out").glob("transformer-*.safetensors")) == [
        "transformer-0.safetensors", "transformer-1.safetensors"]
    model = gt.assemble(tmp_path / "out", tmp_path / "model", tiny_model_dir)
    pipe = FluxMusicPipeline.from_pretrained(model)
    assert pipe.takes_context
    out = pipe("calm piano", steps=1, duration=1.0, seed=0)
    assert np.isfinite(out.audio[0]).all()
    with pytest.raises(FluxMusicError, match="exists"):
        gt.assemble(tmp_path / "out", tmp_path / "model", tiny_model_dir)
