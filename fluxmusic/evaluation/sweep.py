"""Steps versus quality: every sampling option from the same noise, scored by its latent distance to a many-step
Heun solution (the ODE's answer, to solver error) and by FAD and CLAP score of the decoded audio.

Two phases. The grid: every solver (Euler, Heun, AB2) x step count x time schedule. The options: guidance
intervals, step-cache thresholds and guidance schedules, each alone on top of a few base settings (the model's
current default and the cheapest grid setting that matches the target). A setting *matches* the target
(uniform Euler-50, the official sampler) when its latent distance to the reference is no larger than the
target's AND its FAD and CLAP score are within the metrics' noise of the target's; the noise is measured by
running the target a second time from other seeds. Cost is counted in batched cond+uncond evaluations per clip
(``cost``: an evaluation outside the guidance interval runs half the rows and counts 0.5; one the cache
answered counts 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from fluxmusic.evaluation import metrics as M
from fluxmusic.evaluation.embedders import Embedder
from fluxmusic.evaluation.generation import PLAIN_OPTIONS, decode_full, solve_with_stats
from fluxmusic.flow import SOLVERS, function_evaluations  # (the grid sweeps every solver by default)
from fluxmusic.pipeline import FluxMusicPipeline

STEPS = (4, 6, 8, 12, 16, 25, 50)
#: guidance intervals swept: CFG skipped near the data end (where the interval measurement found it cheap)
INTERVALS = ((0.1, 1.0), (0.2, 1.0), (0.3, 1.0))
CACHE_THRESHOLDS = (0.05, 0.1, 0.2)
SCHEDULES = ("linear", "cosine")
REFERENCE_STEPS = 200  # Heun
TARGET_STEPS = 50  # Euler, uniform schedule: the official sampler, what "matching" is measured against
#: Floors of the metric tolerance (the measured seed-to-seed noise is used when larger): FAD no worse than the
#: target's by this fraction, CLAP score by this much.
FAD_TOLERANCE = 0.05
CLAP_TOLERANCE = 0.005
#: the target's second run uses seeds seed + NOISE_SEED_OFFSET + i
NOISE_SEED_OFFSET = 100_000
SETTING_KEYS = ("solver", "steps", "shift", *PLAIN_OPTIONS)


def relative_distance(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over items of ||x - ref|| / ||ref|| (latent RMS error relative to the reference's size)."""
    d = (x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    return float(d.mean())


def setting_label(r: dict) -> str:
    """``ab2 16, shift 3, interval [0.2, 1], cache 0.1, linear guidance`` (only the options that are on)."""
    parts = [f"{r['solver']} {r['steps']}", "uniform" if r["shift"] is None else f"shift {r['shift']:g}"]
    lo, hi = r.get("guidance_interval", (0.0, 1.0))
    if (lo, hi) != (0.0, 1.0):
        parts.append(f"interval [{lo:g}, {hi:g}]")
    if r.get("cache_threshold"):
        parts.append(f"cache {r['cache_threshold']:g}")
    if r.get("guidance_schedule", "constant") != "constant":
        parts.append(f"{r['guidance_schedule']} guidance")
    return ", ".join(parts)


def _setting(solver: str, steps: int, shift: float | None, **options) -> dict:
    return {"solver": solver, "steps": steps, "shift": shift, **{**PLAIN_OPTIONS, **options}}


def steps_sweep(pipe: FluxMusicPipeline, prompts: Sequence[str], text_emb: np.ndarray, ref_emb: np.ndarray,
                embedder: Embedder, *, guidance: float, seed: int = 0, steps: Sequence[int] = STEPS,
                shifts: Sequence[float | None] = (None, 3.0), solvers: Sequence[str] = SOLVERS,
                intervals: Sequence[tuple[float, float]] = INTERVALS,
                cache_thresholds: Sequence[float] = CACHE_THRESHOLDS, schedules: Sequence[str] = SCHEDULES,
                base: dict | None = None, target_steps: int = TARGET_STEPS, reference_steps: int = REFERENCE_STEPS,
                batch_size: int = 8, score_all: bool = True, progress: bool = True) -> dict:
    """One row per setting; ``text_emb`` are the prompts' CLAP text embeddings, ``ref_emb`` the reference
    clips' audio embeddings (FAD here is the generated subset against all of them: biased by the small N, but
    the same N for every row, so rows compare). ``base`` (solver, steps, shift): the model's current default,
    the first setting the options are tried on. ``score_all`` False decodes and scores (FAD, CLAP) only what the
    answer needs: the target, and the rows that match it by latent distance, cheapest first, until one matches
    by the metrics too (the others' metrics are None); the decoder and CLAP are most of a sweep's time on a
    small CPU."""
    seeds = [seed + i for i in range(len(prompts))]
    grid = [_setting(s, n, sh) for sh in shifts for s in solvers for n in steps]
    if not any((g["solver"], g["steps"], g["shift"]) == ("euler", target_steps, None) for g in grid):
        grid.append(_setting("euler", target_steps, None))
    options = ([{"guidance_interval": tuple(iv)} for iv in intervals]
               + [{"cache_threshold": float(c)} for c in cache_thresholds]
               + [{"guidance_schedule": s} for s in schedules])
    n_bases = 1 + (base is not None)
    total = (2 * reference_steps + 2 * target_steps + sum(function_evaluations(g["steps"], g["solver"]) for g in grid)
             + n_bases * len(options) * 2 * max(steps))  # the options' part is a bound: the bar may stop short
    bar = tqdm(total=total * len(prompts), desc="steps sweep", unit="eval", disable=not progress)

    def solve(st: dict, seeds_: Sequence[int] = seeds) -> tuple[torch.Tensor, dict]:
        out, cost, calls = [], 0.0, 0.0
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i : i + batch_size])
            opts = {k: st[k] for k in PLAIN_OPTIONS}
            lat, stats = solve_with_stats(pipe, chunk, seeds_[i : i + len(chunk)], st["steps"], st["solver"],
                                          st["shift"], guidance, on_step=partial(bar.update, len(chunk)), **opts)
            out.append(lat)
            cost += stats["cfg_evaluations"] * len(chunk)
            calls += stats["evaluations"] * len(chunk)
        return torch.cat(out), {"cost": cost / len(prompts), "nfe": calls / len(prompts)}

    def score(lat: torch.Tensor) -> tuple[float, float]:
        emb = embedder.embed_audio(decode_full(pipe, lat), pipe.sample_rate)
        return M.frechet_distance(emb, ref_emb), M.clap_score(text_emb, emb)

    ref, _ = solve(_setting("heun", reference_steps, None))
    done: dict[tuple, dict] = {}

    target_key = tuple(_setting("euler", target_steps, None)[k] for k in SETTING_KEYS)

    latents: dict[tuple, torch.Tensor] = {}

    def key_of(st: dict) -> tuple:
        return tuple(st[k] for k in SETTING_KEYS)

    def score_row(key: tuple) -> dict:
        r = done[key]
        if r["fad"] is None:
            r["fad"], r["clap_score"] = score(latents[key])
        return r

    def run(st: dict, kind: str) -> dict:
        key = key_of(st)
        if key not in done:
            lat, counts = solve(st)
            latents[key] = lat
            done[key] = {**st, "kind": kind, "label": setting_label(st), **counts,
                         "latent_distance": relative_distance(lat, ref), "fad": None, "clap_score": None}
            if score_all or key == target_key:
                score_row(key)
        return done[key]

    def cheapest_both(noise: dict) -> dict | None:
        """Without ``score_all``: score the rows that match by latent distance, cheapest first, until one also
        matches by FAD and CLAP (no cheaper row can be the answer, so the rest stay unscored)."""
        if not score_all:
            target = done[target_key]
            tol = tolerances(target, noise)
            for r in sorted(done.values(), key=lambda r: (r["cost"], r["latent_distance"])):
                if r["latent_distance"] > target["latent_distance"]:
                    continue
                score_row(key_of(r))
                if (r["fad"] <= target["fad"] + tol["fad"]
                        and r["clap_score"] >= target["clap_score"] - tol["clap_score"]):
                    break
        return fewest_matching(list(done.values()), target_steps, noise).get("both")

    run(_setting("euler", target_steps, None), "grid")
    if base is not None:  # the model's current default is a candidate like any grid setting
        run(_setting(base["solver"], base["steps"], base["shift"]), "grid")
    for st in grid:
        run(st, "grid")
    # The metrics' noise: the target again from other seeds (FAD / CLAP of a different sample of the same model).
    lat2, _ = solve(_setting("euler", target_steps, None), [s + NOISE_SEED_OFFSET for s in seeds])
    fad2, clap2 = score(lat2)
    target = done[target_key]
    noise = {"fad": abs(target["fad"] - fad2), "clap_score": abs(target["clap_score"] - clap2),
             "second_seed": {"fad": fad2, "clap_score": clap2}}
    bases = []
    if base is not None:
        bases.append(_setting(base["solver"], base["steps"], base["shift"]))
    cheapest = cheapest_both(noise)
    if cheapest is not None and key_of(_setting(cheapest["solver"], cheapest["steps"], cheapest["shift"])) not in {
            key_of(b) for b in bases}:
        bases.append(_setting(cheapest["solver"], cheapest["steps"], cheapest["shift"]))
    for b in bases:
        for opt in options:
            run({**b, **opt}, "option")
    cheapest_both(noise)
    bar.close()
    rows = list(done.values())
    ref_audio = embedder.embed_audio(decode_full(pipe, ref), pipe.sample_rate)
    return {"n_prompts": len(prompts), "guidance": guidance,
            "reference_solver": {"solver": "heun", "steps": reference_steps,
                                 "fad": M.frechet_distance(ref_audio, ref_emb),
                                 "clap_score": M.clap_score(text_emb, ref_audio)},
            "noise": noise, "bases": [setting_label(b) for b in bases],
            "rows": rows, "fewest": fewest_matching(rows, target_steps, noise)}


def tolerances(target: dict, noise: dict | None) -> dict[str, float]:
    """How far a row's FAD may rise and its CLAP score fall below the target's and still match: the measured
    seed-to-seed noise, at least the fixed floors."""
    noise = noise or {}
    return {"fad": max(noise.get("fad", 0.0), FAD_TOLERANCE * target["fad"]),
            "clap_score": max(noise.get("clap_score", 0.0), CLAP_TOLERANCE)}


def fewest_matching(rows: list[dict], target_steps: int = TARGET_STEPS, noise: dict | None = None) -> dict:
    """The cheapest settings (by ``cost``, then latent distance) that match ``target_steps``-step uniform Euler:

    * ``latent``: latent distance to the Heun reference solution no larger than the target's (as accurate a
      solve; a noise-free criterion);
    * ``metrics``: FAD and CLAP score within the tolerances (:func:`tolerances`) of the target's;
    * ``both``: both at once (what the model's defaults follow).
    """
    plain = {k: v for k, v in PLAIN_OPTIONS.items()}
    target = next((r for r in rows if (r["solver"], r["steps"], r["shift"]) == ("euler", target_steps, None)
                   and all(_same(r.get(k, v), v) for k, v in plain.items())), None)
    if target is None:
        return {}
    tol = tolerances(target, noise)
    keys = (*SETTING_KEYS, "label", "nfe", "cost")
    out = {"target": {k: target.get(k) for k in keys}, "tolerance": tol}

    def latent(r: dict) -> bool:
        return r["latent_distance"] <= target["latent_distance"]

    def metrics(r: dict) -> bool:
        if r["fad"] is None:  # not scored (``score_all`` False): it did not match by latent distance
            return False
        return r["fad"] <= target["fad"] + tol["fad"] and r["clap_score"] >= target["clap_score"] - tol["clap_score"]

    tests = {"latent": latent, "metrics": metrics, "both": lambda r: latent(r) and metrics(r)}
    for name, ok in tests.items():
        found = sorted((r for r in rows if ok(r)), key=lambda r: (_cost(r), r["latent_distance"]))
        out[name] = {k: found[0].get(k) for k in keys} if found else None
    return out


def _cost(r: dict) -> float:
    return r["cost"] if "cost" in r else function_evaluations(r["steps"], r["solver"])


def _same(a, b) -> bool:
    return tuple(a) == tuple(b) if isinstance(b, tuple) else a == b
