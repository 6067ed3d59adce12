"""Steps versus quality: every (solver, schedule, steps) from the same noise, scored by its latent distance to a
many-step Heun solution (the ODE's answer, to solver error) and by FAD and CLAP score of the decoded audio."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from fluxmusic.evaluation import metrics as M
from fluxmusic.evaluation.embedders import Embedder
from fluxmusic.evaluation.generation import decode_full, solve_latents
from fluxmusic.flow import function_evaluations
from fluxmusic.pipeline import FluxMusicPipeline

STEPS = (4, 6, 8, 12, 16, 25, 50)
SOLVERS = ("euler", "heun")
REFERENCE_STEPS = 200  # Heun
TARGET_STEPS = 50  # Euler, uniform schedule: the official sampler, what "matching" is measured against
#: Metric-level match: FAD no worse than the target's by more than this fraction, CLAP score by this much.
FAD_TOLERANCE = 0.05
CLAP_TOLERANCE = 0.005


def relative_distance(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over items of ||x - ref|| / ||ref|| (latent RMS error relative to the reference's size)."""
    d = (x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    return float(d.mean())


def steps_sweep(pipe: FluxMusicPipeline, prompts: Sequence[str], text_emb: np.ndarray, ref_emb: np.ndarray,
                embedder: Embedder, *, guidance: float, seed: int = 0, steps: Sequence[int] = STEPS,
                shifts: Sequence[float | None] = (None, 3.0), target_steps: int = TARGET_STEPS,
                reference_steps: int = REFERENCE_STEPS, batch_size: int = 8, progress: bool = True) -> dict:
    """One row per configuration; ``text_emb`` are the prompts' CLAP text embeddings, ``ref_emb`` the reference
    clips' audio embeddings (FAD here is the generated subset against all of them: biased by the small N, but
    the same N for every row, so rows compare)."""
    seeds = [seed + i for i in range(len(prompts))]
    configs = [(s, n, sh) for sh in shifts for s in SOLVERS for n in steps]
    total = reference_steps + sum(n for _, n, _ in configs)
    bar = tqdm(total=total * len(prompts), desc="steps sweep", unit="step", disable=not progress)

    def solve(solver: str, n: int, shift: float | None) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i : i + batch_size])
            out.append(solve_latents(pipe, chunk, seeds[i : i + len(chunk)], n, solver, shift, guidance,
                                     on_step=partial(bar.update, len(chunk))))
        return torch.cat(out)

    ref = solve("heun", reference_steps, None)
    rows = []
    for solver, n, shift in configs:
        lat = solve(solver, n, shift)
        emb = embedder.embed_audio(decode_full(pipe, lat), pipe.sample_rate)
        rows.append({"solver": solver, "steps": n, "shift": shift, "nfe": function_evaluations(n, solver),
                     "latent_distance": relative_distance(lat, ref), "fad": M.frechet_distance(emb, ref_emb),
                     "clap_score": M.clap_score(text_emb, emb)})
    bar.close()
    ref_audio = embedder.embed_audio(decode_full(pipe, ref), pipe.sample_rate)
    return {"n_prompts": len(prompts), "reference_solver": {"solver": "heun", "steps": reference_steps,
            "fad": M.frechet_distance(ref_audio, ref_emb), "clap_score": M.clap_score(text_emb, ref_audio)},
            "rows": rows, "fewest": fewest_matching(rows, target_steps)}


def fewest_matching(rows: list[dict], target_steps: int = TARGET_STEPS) -> dict:
    """The cheapest configurations (by model evaluations) that match ``target_steps``-step uniform Euler:

    * ``latent``: latent distance to the Heun reference solution no larger than the target's (as accurate a
      solve; a noise-free criterion);
    * ``metrics``: FAD and CLAP score within ``FAD_TOLERANCE`` / ``CLAP_TOLERANCE`` of the target's.
    """
    target = next((r for r in rows if (r["solver"], r["steps"], r["shift"]) == ("euler", target_steps, None)), None)
    if target is None:
        return {}
    fad_ok = target["fad"] * (1 + FAD_TOLERANCE)
    out = {"target": {k: target[k] for k in ("solver", "steps", "shift", "nfe")}}
    tests = {
        "latent": lambda r: r["latent_distance"] <= target["latent_distance"],
        "metrics": lambda r: r["fad"] <= fad_ok and r["clap_score"] >= target["clap_score"] - CLAP_TOLERANCE,
    }
    for name, ok in tests.items():
        found = sorted((r for r in rows if ok(r)), key=lambda r: (r["nfe"], r["latent_distance"]))
        out[name] = {k: found[0][k] for k in ("solver", "steps", "shift", "nfe")} if found else None
    return out
