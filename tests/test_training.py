"""The training loop: learning, exact kill-and-resume, DDP on 2 CPU processes, checkpoint errors, CFG, EMA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.training.cache import CachedEmbeddingDataset, write_cache
from fluxmusic.training.checkpointing import CHECKPOINT_NAME, FORMAT
from fluxmusic.training.config import TrainConfig
from fluxmusic.training.ema import EMA
from fluxmusic.training.loop import LOG_NAME, train
from fluxmusic.training.sampler import ShardedBatchSampler
from fluxmusic.training.transformer_task import TransformerTask, cfg_dropout

# A micro transformer (same architecture) and micro latents: 4 tokens of music, 3 of text.
MICRO = FluxMusicConfig(
    in_channels=32, vec_in_dim=16, context_in_dim=24, hidden_size=32, num_heads=2, depth=1,
    depth_single_blocks=1, axes_dim=(4, 6, 6),
)
LATENT, LT = (8, 4, 4), 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_cache(directory: Path, n: int = 24, seed: int = 0) -> Path:
    """Latents that depend on their caption's embedding, so there is something to learn."""
    g = torch.Generator().manual_seed(seed)

    def items():
        for i in range(n):
            code = torch.randn(24, generator=g)
            latent = 0.3 * torch.randn(LATENT, generator=g) + code[:8, None, None]
            yield {"latent": latent, "txt": code.expand(LT, 24).clone(), "y": code[:16].clone(), "caption": f"c{i}"}

    return write_cache(directory, items(), null_txt=torch.zeros(LT, 24), null_y=torch.zeros(16), shard_size=10)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache") / "cache")


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    MICRO.save(path)
    return path


def task_for(cache: Path, config: FluxMusicConfig = MICRO) -> TransformerTask:
    ds = CachedEmbeddingDataset(cache)
    return TransformerTask(config, ds, ds.null_txt, ds.null_y)


def loop_config(**kw) -> TrainConfig:
    base = dict(steps=30, batch_size=4, lr=2e-3, ema_decay=0.9, ema_every=2, log_every=1, ckpt_every=5,
                seed=3, device="cpu")
    return TrainConfig(**{**base, **kw})


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from the JSONL log (a resumed run re-logs steps; they must agree)."""
    out: dict[int, float] = {}
    for line in (run_dir / LOG_NAME).read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == "train":
            assert out.setdefault(rec["step"], rec["loss"]) == rec["loss"], f"step {rec['step']} differs"
    return out


class _Evil:
    """An arbitrary object: a checkpoint holding one must be refused, never unpickled."""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The micro model's ops are tiny: one thread is faster and immune to a busy shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fluxmusic.cli", "train", *args]


# ----------------------------------------------------------------------------------------------- learning
def test_few_steps_lower_the_loss(cache, tmp_path):
    result = train(task_for(cache), loop_config(steps=40, ckpt_every=0), tmp_path / "run")
    losses = train_losses(tmp_path / "run")
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < 0.7 * first, (first, last)
    assert (result.export / "model.safetensors").is_file()  # EMA weights written with save_transformer
    from fluxmusic.transformer_io import load_transformer

    exported = load_transformer(result.export)
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), result.ema.state_dict().values()))


def test_bf16_and_grad_accum_run(cache, tmp_path):
    result = train(task_for(cache), loop_config(steps=2, grad_accum=2, bf16=True, ckpt_every=0), tmp_path / "r")
    assert result.step == 2 and result.train_loss is not None and result.train_loss == result.train_loss


# ----------------------------------------------------------------------------------------------- resume
def test_kill_and_resume_is_bit_identical(cache, config_path, tmp_path):
    steps = 40
    args = ["--data", str(cache), "--config", str(config_path), "--steps", str(steps), "--batch-size", "4",
            "--lr", "2e-3", "--ema-decay", "0.9", "--ema-every", "2", "--log-every", "1", "--ckpt-every", "5",
            "--seed", "3", "--val-items", "0", "--device", "cpu"]
    # A CLI run in a subprocess, SIGKILLed right after its first checkpoint...
    run = tmp_path / "run"
    proc = subprocess.Popen(cli(*args, "--out", str(run)), env=ENV, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / CHECKPOINT_NAME).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    # ... and the same run uninterrupted here (same options as the CLI's), after the kill so the two never race.
    train(task_for(cache), loop_config(steps=steps), tmp_path / "ref")
    killed_at = torch.load(run / CHECKPOINT_NAME, weights_only=True)["step"]
    assert 0 < killed_at < steps
    done = subprocess.run(cli(*args, "--out", str(run), "--resume"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    a = torch.load(tmp_path / "ref" / CHECKPOINT_NAME, weights_only=True)
    b = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    assert a["step"] == b["step"] == steps and a["data"] == b["data"]
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # Step for step: every logged loss of the killed + resumed run equals the uninterrupted one.
    ref_losses, run_losses = train_losses(tmp_path / "ref"), train_losses(run)
    assert set(run_losses) == set(range(1, steps + 1))
    assert run_losses == ref_losses


def test_refuses_to_overwrite_and_resume_when_done(cache, tmp_path):
    train(task_for(cache), loop_config(steps=2), tmp_path / "run")
    with pytest.raises(FluxMusicError, match="--resume"):
        train(task_for(cache), loop_config(steps=2), tmp_path / "run")
    assert train(task_for(cache), loop_config(steps=2), tmp_path / "run", resume=True).step == 2


# ----------------------------------------------------------------------------------------------- errors
def test_corrupt_and_mismatched_checkpoints_are_clear_errors(cache, tmp_path):
    run = tmp_path / "run"
    train(task_for(cache), loop_config(steps=2), run)
    ckpt = run / CHECKPOINT_NAME
    good = ckpt.read_bytes()

    ckpt.write_bytes(good[: len(good) // 2])  # truncated, as by a full disk
    with pytest.raises(FluxMusicError, match="corrupt"):
        train(task_for(cache), loop_config(steps=4), run, resume=True)

    torch.save({"format": FORMAT, "evil": _Evil()}, ckpt)
    with pytest.raises(FluxMusicError, match="weights_only"):
        train(task_for(cache), loop_config(steps=4), run, resume=True)

    ckpt.write_bytes(good)
    other = FluxMusicConfig(**{**MICRO.to_dict(), "hidden_size": 64, "num_heads": 4})
    with pytest.raises(FluxMusicError, match="different model configuration.*hidden_size"):
        train(task_for(cache, other), loop_config(steps=4), run, resume=True)
    with pytest.raises(FluxMusicError, match="global batch"):
        train(task_for(cache), loop_config(steps=4, batch_size=2), run, resume=True)


def test_cache_rejects_mismatched_config(cache):
    other = FluxMusicConfig(**{**MICRO.to_dict(), "context_in_dim": 32})
    with pytest.raises(FluxMusicError, match="context_in_dim"):
        task_for(cache, other)


# ----------------------------------------------------------------------------------------------- DDP
DDP_DRIVER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_training import task_for, loop_config
from fluxmusic.training import loop
from pathlib import Path
out = Path({out!r})
result = loop.train(task_for(Path({cache!r})), loop_config(steps=4, batch_size=2, ckpt_every=2, log_every=1), out)
rank = __import__("os").environ["RANK"]
flat = torch.cat([p.detach().flatten() for p in result.model.parameters()])
ema = torch.cat([p.flatten() for p in result.ema.parameters()])
torch.save({{"params": flat, "ema": ema}}, out / f"rank{{rank}}.pt")
"""


def test_ddp_two_cpu_processes_stay_in_sync(cache, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER.format(tests=str(Path(__file__).parent), out=str(out), cache=str(cache)))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)],
        env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["params"], r1["params"]) and torch.equal(r0["ema"], r1["ema"])
    ckpt = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["global_batch"] == 4 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["generator"], ckpt["rng"][1]["generator"])  # per-rank noise
    assert ckpt["data"] == {"epoch": 0, "batch": 4}  # 24 items / 2 ranks / batch 2 = 6 batches per epoch
    lines = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in lines if r["event"] == "train"] == [1, 2, 3, 4]  # rank 0 only logs


# ----------------------------------------------------------------------------------------------- parts
def test_cfg_dropout_is_p_per_encoder_independently():
    b, p = 40_000, 0.1
    txt, y = torch.randn(b, 2, 3), torch.randn(b, 5)
    null_txt, null_y = torch.full((2, 3), 7.0), torch.full((5,), 7.0)
    g = torch.Generator().manual_seed(0)
    out_txt, out_y, d_txt, d_y = cfg_dropout(txt, y, null_txt, null_y, p, g)
    assert abs(d_txt.float().mean() - p) < 0.006 and abs(d_y.float().mean() - p) < 0.006
    assert abs((d_txt & d_y).float().mean() - p * p) < 0.002  # independent: P(both) = p^2
    assert torch.equal(out_txt[d_txt], null_txt.expand(int(d_txt.sum()), 2, 3))
    assert torch.equal(out_txt[~d_txt], txt[~d_txt]) and torch.equal(out_y[~d_y], y[~d_y])
    assert torch.equal(out_y[d_y], null_y.expand(int(d_y.sum()), 5))


def test_ema_math():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9, every=2)
    expected = 1.0
    for step in range(1, 9):
        with torch.no_grad():
            model.weight.fill_(float(step * 10))
        updated = ema.update(model, step)
        assert updated == (step % 2 == 0)
        if updated:
            expected = 0.9 * expected + 0.1 * step * 10
        assert abs(float(ema.model.weight) - expected) < 1e-4
    assert not ema.model.weight.requires_grad


def test_sampler_shards_are_disjoint_and_resumable():
    a, b = ShardedBatchSampler(10, 2, seed=1, rank=0, world_size=2), ShardedBatchSampler(10, 2, 1, 1, 2)
    epoch0 = [a.next_batch() + b.next_batch() for _ in range(a.batches_per_epoch)]
    assert sorted(i for batch in epoch0 for i in batch) == list(range(8)) or len({*sum(epoch0, [])}) == 8
    c = ShardedBatchSampler(10, 2, seed=1, rank=0, world_size=2)
    c.position.epoch, c.position.batch = a.position.epoch, a.position.batch
    assert c.next_batch() == a.next_batch()
    with pytest.raises(FluxMusicError, match="fewer than one batch"):
        ShardedBatchSampler(3, 4, seed=0)
