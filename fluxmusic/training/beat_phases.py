"""Add each clip's beat phase and melody pitch to an embedding cache (the training inputs of the beat grid and
the register hint).

For every cache item with a BPM (``bpm``, or the synth corpus's ``tempo_bpm``), the phase of its beat is read
from the clip's audio (:func:`fluxmusic.beat.estimate_beat_phase`) and written to ``items.jsonl`` as ``beat_t0``
(seconds), with ``seconds_per_latent_frame`` in ``cache.json``'s metadata. With ``--melody`` every item also
gets ``melody_midi``, its melody's median MIDI pitch as the evaluation measures it
(:func:`fluxmusic.evaluation.attributes.estimate_melody_pitch`, the ``--vocabulary``'s melody rule): the register
hint then trains on the pitch each clip has, not the centre of its register class. Items are matched to the corpus
manifest by their ``path`` when the cache keeps it, else by caption and score attributes (caches written before
it did)::

    python -m fluxmusic.training.beat_phases --cache RUN/cache --manifest RUN/corpus/manifest.jsonl [--melody]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fluxmusic.errors import FluxMusicError

_MATCH_KEYS = ("caption", "work", "transpose", "bpm", "tempo_bpm", "note_density")


def _key(row: dict) -> tuple:
    return tuple(json.dumps(row.get(k)) for k in _MATCH_KEYS)


def add_beat_phases(cache_dir: str | Path, manifest: str | Path, seconds: float = 10.24,
                    melody: str | None = None) -> dict[str, float]:
    """Write ``beat_t0`` (and, with ``melody`` naming an attribute space, ``melody_midi``) into the cache's items,
    atomically; returns counts, the median beat lock and the median melody pitch."""
    from fluxmusic.audio import read_audio
    from fluxmusic.beat import estimate_beat_phase, item_bpm
    from fluxmusic.checkpoint import atomic_write_text, read_json
    from fluxmusic.data.manifest import load_manifest
    from fluxmusic.evaluation.attributes import SPACES, estimate_melody_pitch
    from fluxmusic.training.cache import INDEX_NAME, ITEMS_NAME

    if melody is not None and melody not in SPACES:
        raise FluxMusicError(f"vocabulary {melody!r} is not known; allowed: {', '.join(SPACES)}")
    cache = Path(cache_dir)
    index = read_json(cache / INDEX_NAME, "embedding cache index")
    items = [json.loads(line) for line in (cache / ITEMS_NAME).read_text().splitlines()]
    entries = load_manifest(manifest)
    by_path = {str(Path(e.path).resolve()): e for e in entries}
    by_key = {_key({"caption": e.caption, **e.attributes}): e for e in entries}
    sr = 16000
    done, locks, pitches = 0, [], []
    for it in items:
        bpm = item_bpm(it)
        if bpm is None and melody is None:
            continue
        e = by_path.get(str(Path(it["path"]).resolve())) if it.get("path") else None
        e = e or by_key.get(_key(it))
        if e is None:
            raise FluxMusicError(f"cache item {it.get('caption')!r} has no matching clip in {manifest}")
        wave = read_audio(e.path, sr, start=int(round(e.start * sr)))[: int(round(seconds * sr))]
        if bpm is not None:
            it["beat_t0"], lock = estimate_beat_phase(wave, sr, bpm)
            locks.append(lock)
            done += 1
        if melody is not None:
            pitch = estimate_melody_pitch(wave, sr, SPACES[melody].melody)
            it["melody_midi"] = round(pitch, 2) if np.isfinite(pitch) else None
            pitches.append(pitch)
    if not done:
        raise FluxMusicError(f"no item of {cache} has a bpm: nothing to phase")
    index.setdefault("metadata", {})["seconds_per_latent_frame"] = seconds / index["shapes"]["latent"][1]
    atomic_write_text(cache / ITEMS_NAME, "".join(json.dumps(it) + "\n" for it in items))
    atomic_write_text(cache / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    summary = {"items": len(items), "phased": done, "median_lock": float(np.median(locks))}
    if melody is not None:
        summary["median_melody_midi"] = float(np.nanmedian(pitches)) if np.isfinite(pitches).any() else float("nan")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, help="the embedding cache directory")
    ap.add_argument("--manifest", required=True, help="the corpus manifest its clips came from")
    ap.add_argument("--seconds", type=float, default=10.24, help="clip length the cache's latents cover")
    ap.add_argument("--melody", action="store_true", help="also write each clip's measured melody pitch")
    ap.add_argument("--vocabulary", default="render", help="attribute space whose melody rule measures the pitch "
                    "(render: the rendered corpus; synth)")
    args = ap.parse_args(argv)
    try:
        print(json.dumps(add_beat_phases(args.cache, args.manifest, args.seconds,
                                         args.vocabulary if args.melody else None)))
    except FluxMusicError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
