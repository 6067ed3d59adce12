"""``fluxmusic eval --task continue|infill|long``: continuation, infilling and long form measured on held-out clips.

For each held-out clip (a reference manifest's entries, e.g. ``--split val`` of a rendered corpus) and its caption:

* **continue**: keep ``0:SEAM`` of the clip and generate the rest; **infill**: regenerate ``A:B`` and keep both
  sides; **long**: continue the clip's ``0:SEAM`` into a song of ``long_duration`` seconds (windowed).
* **Seam continuity** (:func:`fluxmusic.continuation.seam_continuity`): the log-mel step and the spectral flux
  between adjacent mel frames across each seam over the same statistics within 1 s around it (1 = as smooth as
  the music around it). Baselines measured the same way: the real clip at the same time (inside a real clip),
  and for continue the naive join (the clip's first SEAM seconds followed by an independent generation of the
  same caption and seed, what concatenating clips gives).
* **Kept SNR**: waveform SNR of the output's kept region against the given audio (spliced, the default), of the
  model's own decoding of it (VAE + vocoder round trip), and the phase-free mel SNR of that decoding.
* **FAD of the generated regions**: CLAP-embedding Frechet distance of the generated spans against the same
  spans of the reference clips; the floor is the held-out clips' own real spans against the same reference
  (same counts, so the two are comparable), and for continue the naive join's generated spans (text-to-music).
* **Consistency across windows** (long): tempo (onset autocorrelation, agreement within 8 %), key (CQT chroma
  against key profiles, same key; and the correlation of the two windows' mean chroma) and instrument
  (zero-shot CLAP) of window k against window 1, with the eval's estimators;
  the baseline is the same measure between two clips of one real work (consecutive excerpts of a piece).
* **Cost**: sampling seconds (and model evaluations) per minute of output audio.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fluxmusic.continuation import seam_continuity
from fluxmusic.evaluation import metrics as M
from fluxmusic.evaluation.attributes import estimate_key, estimate_tempo, key_name, mean_chroma
from fluxmusic.evaluation.data import Reference
from fluxmusic.evaluation.embedders import Embedder, class_prototypes, zero_shot_probs
from fluxmusic.pipeline import FluxMusicPipeline

TASKS = ("continue", "infill", "long")
#: Tempo estimates this close (relative) count as the same tempo.
TEMPO_TOLERANCE = 0.08


def _seam(wave: np.ndarray, t: float, sr: int) -> dict:
    s = seam_continuity(wave, t, sr)
    return {"logmel_ratio": s["logmel_ratio"], "flux_ratio": s["flux_ratio"]}


def _mean(rows: Sequence[dict], key: str) -> float | None:
    v = np.array([r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])], dtype=np.float64)
    return float(v.mean()) if v.size else None


def _seam_summary(rows: Sequence[dict]) -> dict:
    """Mean and median of the seam ratios over clips (and seams)."""
    out = {}
    for key in ("logmel_ratio", "flux_ratio"):
        v = np.array([r[key] for r in rows if np.isfinite(r[key])], dtype=np.float64)
        out[key] = float(v.mean()) if v.size else None
        out[key + "_median"] = float(np.median(v)) if v.size else None
    return out


def _span(wave: np.ndarray, a: float, b: float, sr: int) -> np.ndarray:
    return np.asarray(wave[int(round(a * sr)) : int(round(b * sr))], dtype=np.float32)


def _fad(embedder: Embedder, gen: Sequence[np.ndarray], ref: Sequence[np.ndarray], sr: int) -> float:
    return M.frechet_distance(embedder.embed_audio(list(gen), sr), embedder.embed_audio(list(ref), sr))


def _agree_tempo(a: float, b: float) -> bool | None:
    if not (np.isfinite(a) and np.isfinite(b)) or a <= 0 or b <= 0:
        return None
    return abs(math.log(a / b)) <= math.log1p(TEMPO_TOLERANCE)


def _snr_stats(values: Sequence[float]) -> float | None:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.mean(v)) if v.size else None


class ContinuationEval:
    """Runs the tasks on ``clips`` (held-out audio with captions) against ``reference`` (spans for FAD)."""

    def __init__(self, pipe: FluxMusicPipeline, clips: Reference, reference: Reference, embedder: Embedder, *,
                 seed: int = 0, seam: float = 6.0, regenerate: tuple[float, float] = (4.0, 6.0),
                 long_duration: float = 30.0, long_clips: int = 1, options: dict | None = None,
                 audio_options: dict | None = None, save_audio: str | Path | None = None,
                 progress: bool = True) -> None:
        self.pipe, self.clips, self.ref, self.embedder = pipe, clips, reference, embedder
        self.seed, self.seam, self.regen, self.long_duration = seed, seam, regenerate, long_duration
        self.long_clips = long_clips
        self.options = dict(options or {})  # passed to every request (steps, solver, guidance, shift)
        self.audio_options = dict(audio_options or {})  # requests with given audio (blend, resample, conditioning)
        self.save_audio = Path(save_audio) if save_audio else None
        self.progress = progress
        self.sr = pipe.sample_rate
        self.window = pipe.geometry.max_duration

    def _run(self, prompt: str, seed: int, **kw):
        t = time.perf_counter()
        extra = self.audio_options if "audio" in kw else {}
        out = self.pipe(prompt, seed=seed, **self.options, **extra, **kw)
        return out, time.perf_counter() - t

    def _save(self, name: str, wave: np.ndarray) -> None:
        """Write a WAV for listening and plots (``benchmarks/plot_seam.py``) when ``save_audio`` is set."""
        if self.save_audio is not None:
            from fluxmusic.audio import write_audio

            self.save_audio.mkdir(parents=True, exist_ok=True)
            write_audio(self.save_audio / f"{name}.wav", wave, self.sr)

    def _cost(self, sampling_s: float, wall_s: float, evaluations: float, audio_s: float) -> dict:
        return {"sampling_s_per_minute": sampling_s * 60 / audio_s, "wall_s_per_minute": wall_s * 60 / audio_s,
                "evaluations_per_minute": evaluations * 60 / audio_s}

    def _bar(self, desc: str, n: int):
        return tqdm(total=n, desc=desc, disable=not self.progress, leave=False)

    # ------------------------------------------------------------------------------------------ continue
    def continue_(self) -> dict:
        sr, s = self.sr, self.seam
        per, gen_regions, naive_regions, real_regions = [], [], [], []
        samp = wall = evals = audio_s = 0.0
        with self._bar("continue", len(self.clips.waves)) as bar:
            for i, (wave, cap) in enumerate(zip(self.clips.waves, self.clips.captions)):
                out, w = self._run(cap, self.seed + i, audio=wave, keep=f"0:{s:g}")
                fresh, _ = self._run(cap, self.seed + i)
                a = out.audio[0]
                naive = np.concatenate([wave[: int(round(s * sr))], fresh.audio[0]])[: len(a)]
                per.append({"clip": str(self.clips.paths[i]), "seam": _seam(a, s, sr), "real": _seam(wave, s, sr),
                            "naive": _seam(naive, s, sr), "kept_snr_db": out.kept_snr_db[0],
                            "decoded_kept_snr_db": out.decoded_kept_snr_db[0],
                            "decoded_kept_mel_snr_db": out.decoded_kept_mel_snr_db[0]})
                if i < 2:
                    self._save(f"continue{i}.original", wave)
                    self._save(f"continue{i}.continued", a)
                gen_regions.append(_span(a, s, self.window, sr))
                naive_regions.append(_span(fresh.audio[0], 0, self.window - s, sr))
                real_regions.append(_span(wave, s, self.window, sr))
                samp, wall = samp + out.timings["sampling"], wall + w
                evals, audio_s = evals + out.evaluations, audio_s + (self.window - s)
                bar.update()
        ref_regions = [_span(r, s, self.window, sr) for r in self.ref.waves]
        return {
            "keep": f"0:{s:g}", "clips": len(per),
            "seam": {"model": _seam_summary([p["seam"] for p in per]),
                     "real_clip": _seam_summary([p["real"] for p in per]),
                     "naive_join": _seam_summary([p["naive"] for p in per])},
            "kept_snr_db": _snr_stats([p["kept_snr_db"] for p in per]),
            "decoded_kept_snr_db": _snr_stats([p["decoded_kept_snr_db"] for p in per]),
            "decoded_kept_mel_snr_db": _snr_stats([p["decoded_kept_mel_snr_db"] for p in per]),
            "fad": {"model": _fad(self.embedder, gen_regions, ref_regions, sr),
                    "real_regions": _fad(self.embedder, real_regions, ref_regions, sr),
                    "naive_join": _fad(self.embedder, naive_regions, ref_regions, sr)},
            # cost per minute of *generated* audio (the kept part costs nothing new)
            "cost": self._cost(samp, wall, evals, audio_s),
            "per_clip": per,
        }

    # ------------------------------------------------------------------------------------------ infill
    def infill(self) -> dict:
        sr, (a0, b0) = self.sr, self.regen
        per, gen_regions, real_regions = [], [], []
        samp = wall = evals = 0.0
        with self._bar("infill", len(self.clips.waves)) as bar:
            for i, (wave, cap) in enumerate(zip(self.clips.waves, self.clips.captions)):
                out, w = self._run(cap, self.seed + i, audio=wave, regenerate=f"{a0:g}:{b0:g}")
                a = out.audio[0]
                per.append({"clip": str(self.clips.paths[i]), "seam_in": _seam(a, a0, sr),
                            "seam_out": _seam(a, b0, sr), "real_in": _seam(wave, a0, sr),
                            "real_out": _seam(wave, b0, sr), "kept_snr_db": out.kept_snr_db[0],
                            "decoded_kept_snr_db": out.decoded_kept_snr_db[0],
                            "decoded_kept_mel_snr_db": out.decoded_kept_mel_snr_db[0]})
                gen_regions.append(_span(a, a0, b0, sr))
                real_regions.append(_span(wave, a0, b0, sr))
                samp, wall, evals = samp + out.timings["sampling"], wall + w, evals + out.evaluations
                bar.update()
        ref_regions = [_span(r, a0, b0, sr) for r in self.ref.waves]
        audio_s = len(per) * (b0 - a0)
        return {
            "regenerate": f"{a0:g}:{b0:g}", "clips": len(per),
            "seam": {"model": _seam_summary([p[k] for p in per for k in ("seam_in", "seam_out")]),
                     "real_clip": _seam_summary([p[k] for p in per for k in ("real_in", "real_out")])},
            "kept_snr_db": _snr_stats([p["kept_snr_db"] for p in per]),
            "decoded_kept_snr_db": _snr_stats([p["decoded_kept_snr_db"] for p in per]),
            "decoded_kept_mel_snr_db": _snr_stats([p["decoded_kept_mel_snr_db"] for p in per]),
            "fad": {"model": _fad(self.embedder, gen_regions, ref_regions, sr),
                    "real_regions": _fad(self.embedder, real_regions, ref_regions, sr)},
            "cost": self._cost(samp, wall, evals, audio_s),
            "per_clip": per,
        }

    # ------------------------------------------------------------------------------------------ long form
    def _describe(self, waves: Sequence[np.ndarray], instruments: Sequence[str], protos: np.ndarray) -> list[dict]:
        emb = self.embedder.embed_audio(list(waves), self.sr)
        probs = zero_shot_probs(self.embedder, emb, protos)
        prior = self.ref.space.tempo_prior
        out = []
        for w, p in zip(waves, probs):
            chroma = mean_chroma(w, self.sr)
            out.append({"tempo_bpm": estimate_tempo(w, self.sr, prior), "key": estimate_key(w, self.sr, chroma),
                        "chroma": None if chroma is None else [float(c) for c in chroma],
                        "instrument": instruments[int(np.argmax(p))]})
        return out

    @staticmethod
    def _agreement(first: dict, other: dict) -> dict:
        chroma = None
        if first["chroma"] is not None and other["chroma"] is not None:
            chroma = float(np.corrcoef(first["chroma"], other["chroma"])[0, 1])
        return {"tempo": _agree_tempo(first["tempo_bpm"], other["tempo_bpm"]),
                "key": None if first["key"] is None or other["key"] is None else first["key"] == other["key"],
                "chroma": chroma, "instrument": first["instrument"] == other["instrument"]}

    @staticmethod
    def _rates(rows: Sequence[dict]) -> dict:
        out = {}
        for k in ("tempo", "key", "chroma", "instrument"):
            v = [r[k] for r in rows if r[k] is not None]
            out[k] = float(np.mean(v)) if v else None
        return out

    def long(self) -> dict:
        sr, geo = self.sr, self.pipe.geometry
        spf = geo.seconds_per_latent_frame
        space = self.ref.space
        instruments = list(space.vocabularies["instrument"])
        protos = class_prototypes(self.embedder, space.vocabularies["instrument"], space.templates["instrument"])
        songs, seams, agree, per_window = [], [], [], {}
        samp = wall = evals = 0.0
        n = min(self.long_clips, len(self.clips.waves))
        with self._bar("long", n) as bar:
            for i in range(n):
                wave, cap = self.clips.waves[i], self.clips.captions[i]
                req = self.pipe.request(cap, seed=self.seed + i, audio=wave, keep=f"0:{self.seam:g}",
                                        duration=self.long_duration, **self.options, **self.audio_options)
                t = time.perf_counter()
                out = self.pipe.generate(req)
                w = time.perf_counter() - t
                a = out.audio[0]
                if i == 0:
                    self._save("long0", a)
                windows = req.long_form.windows(geo)
                song_seams = [_seam(a, (win.start + win.context / 2) * spf, sr) for win in windows[1:]]
                song_seams.insert(0, _seam(a, self.seam, sr))  # the given audio's seam in window 1
                segs = [_span(a, win.start * spf, min(len(a) / sr, (win.start + win.frames) * spf), sr)
                        for win in windows]
                desc = self._describe(segs, instruments, protos)
                for k, d in enumerate(desc[1:], 1):
                    ag = self._agreement(desc[0], d)
                    agree.append(ag)
                    per_window.setdefault(k + 1, []).append(ag)
                songs.append({"clip": str(self.clips.paths[i]), "windows": len(windows), "seams": song_seams,
                              "window_attributes": desc, "kept_snr_db": out.kept_snr_db[0]})
                seams += song_seams
                samp, wall, evals = samp + out.timings["sampling"], wall + w, evals + out.evaluations
                bar.update()
        # Baseline: two excerpts of one real work (the reference clips grouped by their manifest "work").
        by_work: dict[str, list[int]] = {}
        for j, extra in enumerate(self.ref.extra):
            if extra.get("work"):
                by_work.setdefault(extra["work"], []).append(j)
        pairs = [idx[:2] for idx in by_work.values() if len(idx) >= 2]
        real_agree = []
        if pairs:
            desc = self._describe([self.ref.waves[j] for p in pairs for j in p], instruments, protos)
            real_agree = [self._agreement(desc[2 * q], desc[2 * q + 1]) for q in range(len(pairs))]
        return {
            "duration": self.long_duration, "keep": f"0:{self.seam:g}", "songs": len(songs),
            "plan": req.long_form.describe(geo) if songs else None,
            "seam": {"model": _seam_summary(seams)},
            "consistency": {"model": self._rates(agree),
                            "by_window": {k: self._rates(v) for k, v in sorted(per_window.items())},
                            "real_same_work": self._rates(real_agree) if real_agree else None,
                            "real_pairs": len(real_agree)},
            "cost": self._cost(samp, wall, evals, n * self.long_duration),
            "per_song": songs,
        }

    def run(self, tasks: Sequence[str]) -> dict:
        out: dict = {}
        for task in tasks:
            out[task] = {"continue": self.continue_, "infill": self.infill, "long": self.long}[task]()
        # one text-to-music window for comparison of cost per minute
        cap = self.clips.captions[0]
        o, w = self._run(cap, self.seed)
        out["text_to_music_cost"] = self._cost(o.timings["sampling"], w, o.evaluations, self.window)
        return out


def key_accuracy(ref: Reference, sr: int) -> float | None:
    """Fraction of reference clips whose estimated key equals the manifest's ``key`` and ``mode`` (the key
    estimator's own accuracy on real clips: the ceiling of the key consistency)."""
    hits = [estimate_key(w, sr) == key_name(e["key"], e["mode"])
            for w, e in zip(ref.waves, ref.extra) if e.get("key") and e.get("mode")]
    return float(np.mean(hits)) if hits else None


def _f(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def continuation_table(results: dict) -> str:
    """Markdown tables of a continuation evaluation."""
    lines = ["| task | system | seam log-mel ratio | seam flux ratio | FAD (generated spans) | kept SNR dB "
             "(spliced / decoded / decoded mel) | sampling s per min |", "|---|---|---|---|---|---|---|"]
    for task in ("continue", "infill", "long"):
        r = results.get(task)
        if not r:
            continue
        for key, label in (("real_clip", "real clip at the seam"), ("naive_join", "naive join"),
                           ("model", "model")):
            s = r["seam"].get(key)
            if s is None:
                continue
            fad = r.get("fad", {}).get({"real_clip": "real_regions"}.get(key, key))
            snr = (f"{_f(r.get('kept_snr_db'), '.1f')} / {_f(r.get('decoded_kept_snr_db'), '.1f')} / "
                   f"{_f(r.get('decoded_kept_mel_snr_db'), '.1f')}") if key == "model" and task != "long" else ""
            cost = _f(r["cost"]["sampling_s_per_minute"], ".1f") if key == "model" else ""
            lines.append(f"| {task} | {label} | {_f(s['logmel_ratio'])} | {_f(s['flux_ratio'])} | "
                         f"{_f(fad, '.4f')} | {snr} | {cost} |")
    if "long" in results:
        c = results["long"]["consistency"]
        lines.append("\nlong form: window k against window 1 (fraction with the same tempo within 8 %, the same "
                     "key, the same instrument; mean chroma correlation)")
        lines.append("| | tempo | key | chroma corr. | instrument |\n|---|---|---|---|---|")

        def row(label: str, v: dict) -> str:
            return (f"| {label} | {_f(v['tempo'])} | {_f(v['key'])} | {_f(v['chroma'])} | "
                    f"{_f(v['instrument'])} |")

        lines.append(row("model, all windows", c["model"]))
        lines += [row(f"model, window {k}", v) for k, v in c["by_window"].items()]
        if c.get("real_same_work"):
            lines.append(row(f"two excerpts of one real work ({c['real_pairs']} pairs)", c["real_same_work"]))
    if "text_to_music_cost" in results:
        lines.append(f"\ntext-to-music (one window): {results['text_to_music_cost']['sampling_s_per_minute']:.1f} "
                     "sampling s per minute of audio")
    return "\n".join(lines)
