"""Evaluation inputs: prompts (with the attributes they state) and reference clips."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fluxmusic.errors import FluxMusicError
from fluxmusic.evaluation.attributes import SYNTH, AttributeSpace, parse_attributes, space_for

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


@dataclass
class Prompt:
    text: str
    attributes: dict[str, str] = field(default_factory=dict)  # stated values, corpus vocabulary
    path: Path | None = None  # the clip this caption describes, when the prompts come from a manifest


@dataclass
class Reference:
    waves: list[np.ndarray]
    captions: list[str | None]
    attributes: list[dict[str, str]]
    paths: list[Path]
    space: AttributeSpace = SYNTH  # the attribute space of the reference corpus
    extra: list[dict] = field(default_factory=list)  # per clip: the manifest's other fields (note_density, ...)


def _attributes(obj: dict, text: str, space: AttributeSpace) -> dict[str, str]:
    """Explicit attribute fields win; the rest are read from the text."""
    found = parse_attributes(text, space)
    for k in space.vocabularies:
        if k in obj and obj[k] is not None:
            found[k] = str(obj[k]).lower()
    return found


def _prompt_attributes(obj: dict, text: str, space: AttributeSpace) -> dict[str, str]:
    """What a prompt asks for. A ``prompt`` entry's explicit fields are its author's stated intent and count as
    given. A corpus manifest entry (a clip's ``caption``) carries every attribute of its clip, but its caption
    names only some (the register in about a third of rendered captions): the model is held to those, with the
    manifest's value (the class of "107 BPM" is the manifest's tempo word)."""
    found = _attributes(obj, text, space)
    if "prompt" in obj:
        return found
    said = parse_attributes(text, space)
    return {k: v for k, v in found.items() if k in said}


def _check_split(split: str | None, n_before: int, n_after: int, where: object) -> None:
    if split is not None and n_before and not n_after:
        raise FluxMusicError(f'--split {split!r}: no entry of {where} has "split": "{split}"')


def load_prompts(path: str | Path, space: AttributeSpace = SYNTH, split: str | None = None) -> list[Prompt]:
    """A text file (one prompt per line) or JSONL (``prompt`` or ``caption``, optional attributes and ``path``;
    a corpus manifest works as is; ``split`` keeps only its entries with that ``split`` field)."""
    p = Path(path)
    if not p.is_file():
        raise FluxMusicError(f"prompts file {p} does not exist")
    out: list[Prompt] = []
    lines = p.read_text(encoding="utf-8").splitlines()
    if p.suffix == ".jsonl":
        base = p.resolve().parent
        seen = 0
        for no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise FluxMusicError(f"{p}:{no}: invalid JSON ({e.msg})") from None
            text = obj.get("prompt", obj.get("caption")) if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise FluxMusicError(f'{p}:{no}: needs a non-empty "prompt" or "caption" string')
            seen += 1
            if split is not None and obj.get("split") != split:
                continue
            ref = obj.get("path")
            out.append(Prompt(text.strip(), _prompt_attributes(obj, text, space),
                              (base / ref).resolve() if ref else None))
        _check_split(split, seen, len(out), p)
    else:
        if split is not None:
            raise FluxMusicError(f"--split {split!r} needs JSONL prompts with a split field; {p} is plain text")
        out = [Prompt(t.strip(), parse_attributes(t, space)) for t in lines if t.strip()]
    if len(out) < 2:
        raise FluxMusicError(f"prompts file {p} has {len(out)} prompts; at least 2 are needed")
    return out


def load_reference(path: str | Path, sr: int, seconds: float, limit: int | None = None, split: str | None = None,
                   space: str = "auto") -> Reference:
    """Reference clips from a manifest (JSONL, or a directory holding ``manifest.jsonl``) or a directory of
    audio files; each read at ``sr``, cut or zero-padded to ``seconds`` (the generated length). ``split`` keeps
    the manifest entries with that ``split`` field; ``space`` names the attribute space (``auto``: the
    manifest's, see :func:`~fluxmusic.evaluation.attributes.space_for`)."""
    from fluxmusic.audio import read_audio
    from fluxmusic.data.manifest import load_manifest

    p = Path(path)
    if p.is_dir() and (p / "manifest.jsonl").is_file():
        p = p / "manifest.jsonl"
    n = int(round(seconds * sr))
    items: list[tuple[Path, str | None, dict, float]] = []
    if p.is_file():
        entries = load_manifest(p)
        kept = [e for e in entries if split is None or e.attributes.get("split") == split]
        _check_split(split, len(entries), len(kept), p)
        chosen = space_for([e.attributes for e in kept], space)
        for e in kept:
            items.append((e.path.resolve(), e.caption, e.attributes, e.start))
    elif p.is_dir():
        if split is not None:
            raise FluxMusicError(f"--split {split!r} needs a manifest reference; {p} is a directory of audio")
        chosen = space_for([], space)
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
        items = [(f.resolve(), None, {}, 0.0) for f in files]
    else:
        raise FluxMusicError(f"reference {p} is neither a manifest nor a directory")
    items = items[:limit] if limit else items
    if len(items) < 4:
        raise FluxMusicError(f"reference {path} has {len(items)} clips; at least 4 are needed (two halves of 2)")
    waves = []
    for f, _, _, start in items:
        from fluxmusic.audio import audio_info

        file_sr = audio_info(f)[0]
        w = read_audio(f, sr, start=int(round(start * file_sr)), frames=int(np.ceil(seconds * file_sr)))[:n]
        waves.append(np.pad(w, (0, n - len(w))))
    return Reference(waves, [c for _, c, _, _ in items],
                     [_attributes(a, c, chosen) if c else {} for _, c, a, _ in items],
                     [f for f, _, _, _ in items], chosen, [dict(a) for _, _, a, _ in items])
