"""``evaluate``: generate for every prompt with fixed seeds and score the audio against reference clips, with
the baselines in the same run (reference split halves, shuffled prompts, an untrained transformer)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
from tqdm import tqdm

from fluxmusic.evaluation import metrics as M
from fluxmusic.evaluation.attributes import SYNTH, AttributeSpace, measure
from fluxmusic.evaluation.data import Prompt, Reference
from fluxmusic.evaluation.embedders import Embedder, class_prototypes, zero_shot_probs
from fluxmusic.evaluation.generation import decode_full, solve_latents, untrained_twin
from fluxmusic.evaluation.signal_features import comb_figure, note_density, rhythm_clarity
from fluxmusic.pipeline import FluxMusicPipeline

#: Attributes scored for accuracy and how: measured by signal processing or by zero-shot CLAP.
ACCURACY = {"tempo": "onset autocorrelation", "register": "melody pitch (CQT salience)",
            "instrument": "zero-shot CLAP"}


@dataclass
class Scored:
    """What the metrics need from one set of clips."""

    emb: np.ndarray  # [N, D] unit audio embeddings
    probs: dict[str, np.ndarray]  # vocabulary -> [N, K] zero-shot class distributions
    measured: list[dict]  # per clip: tempo_bpm, melody_midi, tempo, register, comb, note_density, rhythm_clarity


def measure_clip(wave: np.ndarray, sr: int, space: AttributeSpace = SYNTH) -> dict:
    """Tempo and register (classes of ``space``), hop-rate comb figure, note density and rhythm clarity of one
    clip."""
    return {**measure(wave, sr, space), "comb": comb_figure(wave, sr), "note_density": note_density(wave, sr),
            "rhythm_clarity": rhythm_clarity(wave, sr)}


def score_audio(waves: Sequence[np.ndarray], sr: int, embedder: Embedder, protos: dict[str, np.ndarray],
                desc: str, progress: bool, space: AttributeSpace = SYNTH) -> Scored:
    """Embed, classify zero-shot over every vocabulary, and measure tempo, register, comb and note density,
    for a set of clips."""
    emb = embedder.embed_audio(list(waves), sr)
    probs = {v: zero_shot_probs(embedder, emb, p) for v, p in protos.items()}
    measured = [measure_clip(w, sr, space)
                for w in tqdm(waves, desc=f"measure {desc}", disable=not progress, leave=False)]
    return Scored(emb, probs, measured)


def vocabulary_prototypes(embedder: Embedder, space: AttributeSpace = SYNTH) -> dict[str, np.ndarray]:
    """Zero-shot text prototypes of every vocabulary of ``space``, in its order."""
    return {v: class_prototypes(embedder, values, space.templates[v]) for v, values in space.vocabularies.items()}


def signal_summary(s: Scored) -> dict:
    """Comb figure, note density and rhythm clarity over a set of clips (min / median / max / mean)."""
    out: dict = {}
    for key in ("comb", "note_density", "rhythm_clarity"):
        v = np.array([m[key] for m in s.measured], dtype=np.float64)
        v = v[np.isfinite(v)]
        out[key] = ({"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max()),
                     "mean": float(v.mean())} if v.size else None)
    return out


def comb_check(gen: Scored, ref: Scored) -> dict:
    """The README target: every generated clip's comb figure within the reference clips' range (at most their
    maximum; a comb below real music's is no buzz). Silent clips (NaN) count as outside."""
    hi = max((m["comb"] for m in ref.measured if np.isfinite(m["comb"])), default=float("nan"))
    inside = [bool(np.isfinite(m["comb"]) and m["comb"] <= hi) for m in gen.measured]
    return {"reference_max": hi, "fraction_within": float(np.mean(inside)) if inside else None,
            "all_within": bool(inside) and all(inside)}


def attribute_accuracy(s: Scored, stated: Sequence[dict], instruments: Sequence[str] | None = None
                       ) -> dict[str, float | None]:
    """Fraction of clips whose estimated attribute equals the stated one, over clips that state it
    (``instruments``: the instrument classes in zero-shot order; default the synthetic corpus's)."""
    instruments = list(instruments if instruments is not None else SYNTH.vocabularies["instrument"])
    acc: dict[str, float | None] = {}
    for attr in ACCURACY:
        hits = []
        for i, st in enumerate(stated):
            if attr not in st:
                continue
            if attr == "instrument":
                est = instruments[int(np.argmax(s.probs["instrument"][i]))]
            else:
                est = s.measured[i][attr]
            hits.append(est == st[attr])
        acc[attr] = float(np.mean(hits)) if hits else None
    scored = [a for a in acc.values() if a is not None]
    acc["mean"] = float(np.mean(scored)) if scored else None
    return acc


def halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split into two equal halves (one item dropped when n is odd)."""
    perm = np.random.default_rng([seed, 0xFAD]).permutation(n)
    h = n // 2
    return np.sort(perm[:h]), np.sort(perm[h : 2 * h])


def _kl_block(ref: Scored, gen: Scored, paired: bool) -> dict:
    out = {"marginal": {v: M.marginal_kl(ref.probs[v], gen.probs[v]) for v in ref.probs}}
    out["marginal"]["mean"] = float(np.mean(list(out["marginal"].values())))
    if paired:
        out["paired"] = {v: M.paired_kl(ref.probs[v], gen.probs[v]) for v in ref.probs}
        out["paired"]["mean"] = float(np.mean(list(out["paired"].values())))
    return out


def _is_block(s: Scored) -> dict:
    return {v: M.inception_score(s.probs[v]) for v in s.probs}


def _subset(s: Scored, idx: np.ndarray) -> Scored:
    return Scored(s.emb[idx], {v: p[idx] for v, p in s.probs.items()}, [s.measured[i] for i in idx])


def pairing(prompts: Sequence[Prompt], ref: Reference) -> np.ndarray | None:
    """Reference index of each prompt when the prompts are exactly the reference clips' captions (by path)."""
    if len(prompts) != len(ref.paths) or any(p.path is None for p in prompts):
        return None
    where = {p: i for i, p in enumerate(ref.paths)}
    idx = [where.get(p.path) for p in prompts]
    if any(i is None for i in idx) or len(set(idx)) != len(idx):
        return None
    return np.array(idx)


def generate(pipe: FluxMusicPipeline, prompts: Sequence[str], seed: int, steps: int, solver: str,
             shift: float | None, guidance: float, batch_size: int, desc: str, progress: bool,
             options: dict | None = None) -> list[np.ndarray]:
    """Full-length audio for every prompt; prompt i uses seed + i whatever the batching. ``options``: guidance
    interval, step cache, guidance schedule (:data:`fluxmusic.evaluation.generation.PLAIN_OPTIONS`)."""
    bar = tqdm(total=len(prompts) * steps, desc=desc, unit="step", disable=not progress)
    waves: list[np.ndarray] = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        seeds = [seed + i + j for j in range(len(chunk))]
        lat = solve_latents(pipe, chunk, seeds, steps, solver, shift, guidance,
                            on_step=partial(bar.update, len(chunk)), **(options or {}))
        waves += decode_full(pipe, lat)
    bar.close()
    return waves


def evaluate(pipe: FluxMusicPipeline, prompts: Sequence[Prompt], ref: Reference, embedder: Embedder, *,
             steps: int, solver: str, guidance: float, shift: float | None, seed: int = 0, batch_size: int = 4,
             untrained: bool = True, progress: bool = True, options: dict | None = None) -> dict:
    """All metrics for the model and the baselines; see docs/quality.md for their definitions. ``options``: the
    sampling options beyond steps, solver, guidance and shift (guidance interval, step cache, schedule)."""
    sr = pipe.sample_rate
    space = ref.space
    instruments = list(space.vocabularies["instrument"])
    texts = [p.text for p in prompts]
    stated = [p.attributes for p in prompts]
    protos = vocabulary_prototypes(embedder, space)
    timing: dict[str, float] = {}

    t0 = time.perf_counter()
    ref_s = score_audio(ref.waves, sr, embedder, protos, "reference", progress, space)
    timing["score_reference_s"] = time.perf_counter() - t0
    text_emb = embedder.embed_text(texts)
    pair = pairing(prompts, ref)
    ra, rb = halves(len(ref.waves), seed)

    def system(pipe_: FluxMusicPipeline, name: str) -> tuple[dict, Scored]:
        t = time.perf_counter()
        waves = generate(pipe_, texts, seed, steps, solver, shift, guidance, batch_size, f"generate {name}",
                         progress, options)
        timing[f"generate_{name}_s"] = time.perf_counter() - t
        s = score_audio(waves, sr, embedder, protos, name, progress, space)
        if pair is not None:  # generated half for the captions of one reference half vs the other half
            inv = np.argsort(pair)  # reference index -> prompt index
            ga, gb = inv[ra], inv[rb]
        else:
            ga, gb = halves(len(waves), seed + 1)
        fad = 0.5 * (M.frechet_distance(s.emb[ga], ref_s.emb[rb]) + M.frechet_distance(s.emb[gb], ref_s.emb[ra]))
        ref_for_kl = _subset(ref_s, pair) if pair is not None else ref_s
        block = {
            "fad": fad,
            "fad_full": M.frechet_distance(s.emb, ref_s.emb),
            "clap_score": M.clap_score(text_emb, s.emb),
            "kl": _kl_block(ref_for_kl, s, pair is not None),
            "inception_score": _is_block(s),
            "attribute_accuracy": attribute_accuracy(s, stated, instruments),
            "signal": signal_summary(s),
            "comb_check": comb_check(s, ref_s),
        }
        return block, s

    results: dict = {"n_prompts": len(prompts), "n_reference": len(ref.waves), "paired": pair is not None,
                     "half_sizes": [len(ra), len(rb)], "attribute_space": space.name, "systems": {}}
    model_block, model_s = system(pipe, "model")

    # Floor: one half of the real clips against the other, measured exactly as the generated halves are.
    ref_a, ref_b = _subset(ref_s, ra), _subset(ref_s, rb)
    floor = {
        "fad": M.frechet_distance(ref_a.emb, ref_b.emb),
        "kl": {"marginal": {v: M.marginal_kl(ref_a.probs[v], ref_b.probs[v]) for v in ref_s.probs}},
        "inception_score": _is_block(ref_s),
        "attribute_accuracy": attribute_accuracy(ref_s, ref.attributes, instruments),
        "signal": signal_summary(ref_s),
    }
    floor["kl"]["marginal"]["mean"] = float(np.mean(list(floor["kl"]["marginal"].values())))
    if all(c for c in ref.captions):
        floor["clap_score"] = M.clap_score(embedder.embed_text(list(ref.captions)), ref_s.emb)
    results["systems"]["reference"] = floor
    # Targets are relative to the estimators' own accuracy on the real clips (their ceiling).
    model_block["attribute_accuracy_vs_reference"] = {
        k: (v / floor["attribute_accuracy"][k] if v is not None and floor["attribute_accuracy"].get(k) else None)
        for k, v in model_block["attribute_accuracy"].items()}
    results["systems"]["model"] = model_block

    # Shuffled prompts: the same generated audio judged against another prompt's text and attributes.
    perm = M.derangement(len(prompts), seed)
    results["systems"]["shuffled_prompts"] = {
        "clap_score": M.clap_score(text_emb[perm], model_s.emb),
        "attribute_accuracy": attribute_accuracy(model_s, [stated[j] for j in perm], instruments),
    }
    if untrained:
        results["systems"]["untrained"], _ = system(untrained_twin(pipe, seed), "untrained")
    results["per_prompt"] = [
        {"prompt": texts[i], "seed": seed + i, "stated": stated[i],
         "measured": dict(model_s.measured[i]),  # everything measure_clip reports
         "instrument": instruments[int(np.argmax(model_s.probs["instrument"][i]))],
         "clap_score": float(M.cosine_rows(text_emb[i : i + 1], model_s.emb[i : i + 1])[0])}
        for i in range(len(prompts))
    ]
    results["reference_clips"] = [  # the manifest's note density counts score onsets (every note of a chord)
        {"path": str(ref.paths[i]), "comb": m["comb"], "note_density": m["note_density"],
         "score_note_density": (ref.extra[i] if i < len(ref.extra) else {}).get("note_density")}
        for i, m in enumerate(ref_s.measured)
    ]
    results["timing"] = timing
    results["_scored"] = {"reference": ref_s, "text_emb": text_emb}  # reused by the steps sweep; not serialised
    return results
