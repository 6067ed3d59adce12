"""A real-music corpus, offline: music21's bundled scores played by FluidSynth with a General MIDI SoundFont.

``fluxmusic data render`` parses works from the music21 corpus (Bach chorales, Palestrina, folk tunes,
Beethoven, Mozart, ...), picks an instrument, a tempo and a transposition per rendering (seeded), plays every
part through FluidSynth's sampled instruments at 16 kHz, cuts 10.24 s clips and captions each from the score's
metadata and its own notes (collection, composer, era, instrument, tempo in BPM and words, key and mode, metre,
texture, register, dynamics).

Held-out data is split by WORK (a hash of the score path), never by clip, so no validation clip shares a
score with a training clip. Scores that music21 cannot parse or that hold no notes are skipped and counted.

Needs the optional packages ``music21`` and ``pyfluidsynth`` (``pip install -e ".[render]"``) and the
FluidSynth library with a GM SoundFont (Debian: ``apt-get install fluidsynth fluid-soundfont-gm``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fluxmusic.errors import FluxMusicError

#: Where Debian's fluid-soundfont-gm puts its font; ``--soundfont`` overrides.
DEFAULT_SOUNDFONTS = ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/sounds/sf2/default-GM.sf2",
                      "/usr/share/soundfonts/FluidR3_GM.sf2", "/usr/share/soundfonts/default.sf2")
INSTALL_HINT = ("install FluidSynth and a General MIDI SoundFont (Debian/Ubuntu: "
                "`apt-get install fluidsynth fluid-soundfont-gm`) and the Python packages "
                "(`pip install -e \".[render]\"`), or pass --soundfont FILE.sf2")

#: Instrument family -> (caption phrases, GM programs per voice from top to bottom; the last repeats)
INSTRUMENTS: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "piano": (("piano", "grand piano", "solo piano"), (0,)),
    "organ": (("church organ", "pipe organ", "organ"), (19,)),
    "strings": (("string quartet", "strings", "string ensemble"), (40, 40, 41, 42)),
    "choir": (("choir", "vocal ensemble", "choir voices"), (52,)),
    "woodwinds": (("woodwinds", "wind ensemble", "flute, oboe, clarinet and bassoon"), (73, 68, 71, 70)),
    "brass": (("brass", "brass ensemble", "trumpets and horns"), (56, 60, 57, 58)),
    "guitar": (("acoustic guitar", "nylon guitar", "guitar"), (24,)),
    "harpsichord": (("harpsichord", "baroque harpsichord"), (6,)),
    "flute": (("flute", "solo flute", "wooden flute"), (73,)),
    "violin": (("violin", "fiddle", "solo violin"), (40,)),
    "harp": (("harp", "concert harp"), (46,)),
    "mallets": (("marimba", "vibraphone", "mallets"), (12,)),
}
#: Families that suit one voice (tunes) and those that suit several; a work draws from its texture's list.
SOLO_FAMILIES = ("piano", "flute", "violin", "guitar", "harp", "mallets", "organ", "harpsichord")
ENSEMBLE_FAMILIES = ("piano", "organ", "strings", "choir", "woodwinds", "brass", "harpsichord", "guitar", "harp")
#: tempo word -> BPM range [lo, hi), the same words and ranges as the synthetic corpus
TEMPO_WORDS = {"slow": (40, 90), "medium": (90, 130), "fast": (130, 240)}
#: register -> MIDI range of the top voice's median pitch [lo, hi)
REGISTERS = {"low": (0, 57), "mid": (57, 74), "high": (74, 128)}
DYNAMICS = {"soft": (48, 0.25), "loud": (100, 0.8)}  # word -> (MIDI velocity, peak level)
KEY_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")

#: corpus collection -> (caption name, composer, era, tempo range in quarter notes per minute)
COLLECTIONS: dict[str, tuple[str, str | None, str, tuple[int, int]]] = {
    "bach": ("a Bach chorale", "Johann Sebastian Bach", "baroque", (56, 96)),
    "palestrina": ("a Palestrina mass movement", "Giovanni Pierluigi da Palestrina", "renaissance", (100, 160)),
    "ryansMammoth": ("an Irish folk tune", None, "folk", (90, 200)),
    "oneills1850": ("an Irish folk tune", None, "folk", (90, 200)),
    "essenFolksong": ("a European folk song", None, "folk", (70, 150)),
    "airdsAirs": ("a Scottish air", None, "folk", (70, 140)),
    "miscFolk": ("a folk song", None, "folk", (70, 150)),
    "trecento": ("a medieval trecento song", None, "medieval", (60, 120)),
    "monteverdi": ("a Monteverdi madrigal", "Claudio Monteverdi", "renaissance", (70, 130)),
    "josquin": ("a Josquin motet", "Josquin des Prez", "renaissance", (90, 150)),
    "beethoven": ("a Beethoven movement", "Ludwig van Beethoven", "classical", (60, 170)),
    "mozart": ("a Mozart movement", "Wolfgang Amadeus Mozart", "classical", (60, 170)),
    "haydn": ("a Haydn movement", "Joseph Haydn", "classical", (60, 170)),
    "schumann_robert": ("a Schumann piece", "Robert Schumann", "romantic", (50, 140)),
    "schumann_clara": ("a Clara Schumann piece", "Clara Schumann", "romantic", (50, 140)),
    "schubert": ("a Schubert piece", "Franz Schubert", "romantic", (50, 140)),
    "corelli": ("a Corelli sonata", "Arcangelo Corelli", "baroque", (60, 130)),
    "handel": ("a Handel piece", "George Frideric Handel", "baroque", (60, 130)),
    "cpebach": ("a C. P. E. Bach piece", "Carl Philipp Emanuel Bach", "baroque", (60, 140)),
    "joplin": ("a Joplin rag", "Scott Joplin", "ragtime", (70, 110)),
}


@dataclass
class Voice:
    """One part's notes: (onset s, duration s, MIDI pitch) rows, already at the rendering tempo."""

    notes: np.ndarray  # [n, 3] float64
    program: int = 0


@dataclass
class Work:
    """A parsed score, tempo-free: onsets and durations in quarter notes."""

    path: str
    collection: str
    title: str
    parts: list[np.ndarray]  # per part [n, 3]: onset ql, duration ql, MIDI pitch (top part first)
    metronome: float | None  # quarter notes per minute from the score, if it says
    key: tuple[int, str]  # (tonic pitch class, "major" | "minor")
    metre: str
    meta: dict = field(default_factory=dict)


def collection_of(path: str | os.PathLike) -> str:
    parts = Path(path).parts
    return parts[parts.index("corpus") + 1] if "corpus" in parts else Path(path).parent.name


def list_corpus(collections: tuple[str, ...] | None = None) -> list[str]:
    """Paths of music21's bundled works, optionally limited to ``collections``, sorted (deterministic)."""
    from music21 import corpus

    paths = sorted(str(p) for p in corpus.getCorePaths())
    if collections is not None:
        wanted = set(collections)
        unknown = wanted - {collection_of(p) for p in paths}
        if unknown:
            raise FluxMusicError(f"unknown corpus collection(s): {', '.join(sorted(unknown))}; "
                                 f"choose from: {', '.join(sorted(COLLECTIONS))}")
        paths = [p for p in paths if collection_of(p) in wanted]
    return [p for p in paths if Path(p).suffix in (".krn", ".abc", ".mxl", ".xml", ".musicxml")]


def _score_to_work(score, path: str, collection: str) -> Work | None:
    from music21 import tempo

    score = score.stripTies(inPlace=False)
    parts = list(score.parts) if hasattr(score, "parts") and len(score.parts) else [score]
    arrays: list[np.ndarray] = []
    for part in parts:
        rows = []
        for n in part.flatten().notes:
            dur = float(n.quarterLength)
            if dur <= 0:
                continue
            for p in n.pitches:
                rows.append((float(n.getOffsetInHierarchy(part)), dur, float(p.midi)))
        if rows:
            arrays.append(np.asarray(rows, dtype=np.float64))
    if not arrays:
        return None
    # Top voice first: the highest median pitch leads (the melody, for register).
    arrays.sort(key=lambda a: -float(np.median(a[:, 2])))
    marks = list(score.flatten().getElementsByClass(tempo.MetronomeMark))
    metronome = None
    if marks:
        try:
            q = marks[0].getQuarterBPM()
            metronome = float(q) if q and 20 <= q <= 300 else None
        except Exception:  # music21 raises assorted errors on odd tempo marks; the style range decides then
            metronome = None
    try:
        k = score.analyze("key")
        key = (int(k.tonic.pitchClass), "minor" if k.mode == "minor" else "major")
    except Exception:
        key = (0, "major")
    ts = score.flatten().getElementsByClass("TimeSignature")
    metre = ts[0].ratioString if len(ts) else "4/4"
    md = score.metadata
    title = (md.title or md.movementName or "") if md is not None else ""
    return Work(path, collection, str(title), arrays, metronome, key, metre)


def parse_works(path: str, max_per_file: int = 4) -> list[Work]:
    """Parse one corpus file into Works (an ABC/Opus file can hold many tunes; at most ``max_per_file``)."""
    from music21 import converter, stream

    coll = collection_of(path)
    obj = converter.parse(path)
    scores = list(obj.scores)[:max_per_file] if isinstance(obj, stream.Opus) else [obj]
    works = []
    for i, sc in enumerate(scores):
        w = _score_to_work(sc, f"{path}#{i}" if len(scores) > 1 else path, coll)
        if w is not None:
            works.append(w)
    return works


def tempo_word(bpm: float) -> str:
    for w, (_lo, hi) in TEMPO_WORDS.items():
        if bpm < hi:
            return w
    return list(TEMPO_WORDS)[-1]


def register_word(midi: float) -> str:
    for w, (_lo, hi) in REGISTERS.items():
        if midi < hi:
            return w
    return list(REGISTERS)[-1]


def texture_word(n_parts: int) -> str:
    return {1: "solo", 2: "two-part"}.get(n_parts, "three-part" if n_parts == 3 else "four-part")


def choose_rendering(work: Work, rng: np.random.Generator) -> dict:
    """Instrument family, tempo, transposition and dynamics of one rendering of ``work``."""
    families = SOLO_FAMILIES if len(work.parts) == 1 else ENSEMBLE_FAMILIES
    if work.collection == "bach" and rng.random() < 0.4:
        family = "organ"
    elif work.collection == "palestrina" and rng.random() < 0.4:
        family = "choir"
    else:
        family = str(rng.choice(families))
    lo, hi = COLLECTIONS.get(work.collection, ("", None, "", (60, 160)))[3]
    base = work.metronome if work.metronome else float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    bpm = float(np.clip(base * np.exp(rng.normal(0, 0.15)), 40, 230))
    # Keep the top voice in a playable range while varying the key: +-5 semitones, then octave-correct.
    top = float(np.median(work.parts[0][:, 2]))
    shift = int(rng.integers(-5, 6))
    while top + shift > 88:
        shift -= 12
    while top + shift < 45:
        shift += 12
    dyn = "soft" if rng.random() < 0.35 else "loud"
    return {"family": family, "bpm": round(bpm, 1), "transpose": shift, "dynamics": dyn}


class FluidRenderer:
    """A FluidSynth instance with one SoundFont loaded, rendering note lists to mono float32 audio."""

    def __init__(self, soundfont: str | os.PathLike, sample_rate: int = 16000) -> None:
        try:
            import fluidsynth
        except (ImportError, OSError) as e:  # OSError: the Python package is there, libfluidsynth is not
            raise FluxMusicError(f"FluidSynth is not available ({e}); {INSTALL_HINT}") from None
        sf = Path(soundfont)
        if not sf.is_file():
            raise FluxMusicError(f"SoundFont not found: {sf}; {INSTALL_HINT}")
        self.sr = int(sample_rate)
        self.synth = fluidsynth.Synth(samplerate=float(self.sr), gain=0.4)
        self.sfid = self.synth.sfload(str(sf))
        if self.sfid < 0:
            raise FluxMusicError(f"FluidSynth cannot load the SoundFont {sf}")

    def close(self) -> None:
        self.synth.delete()

    def _block(self, n: int) -> np.ndarray:
        if n <= 0:
            return np.zeros(0, np.float32)
        s = np.asarray(self.synth.get_samples(n), dtype=np.float32).reshape(-1, 2)
        return s.mean(axis=1) / 32768.0

    def render(self, voices: list[Voice], velocity: int, tail: float = 1.5, length_s: float = 0.0) -> np.ndarray:
        """Play ``voices`` (one MIDI channel each, skipping the drum channel) and return the mono mix, at least
        ``length_s`` long."""
        events: list[tuple[int, int, int, int]] = []  # (sample, order: offs first, channel, key)
        for v_i, v in enumerate(voices):
            ch = v_i if v_i < 9 else v_i + 1
            self.synth.program_select(ch, self.sfid, 0, int(v.program))
            for on, dur, pitch in v.notes:
                key = int(round(pitch))
                if not 0 <= key <= 127:
                    continue
                events.append((int(on * self.sr), 1, ch, key))
                events.append((int((on + dur) * self.sr) - 1, 0, ch, key))
        events.sort()
        out, now = [], 0
        for at, kind, ch, key in events:
            out.append(self._block(at - now))
            now = max(now, at)
            if kind:
                self.synth.noteon(ch, key, velocity)
            else:
                self.synth.noteoff(ch, key)
        out.append(self._block(max(int(tail * self.sr), int(length_s * self.sr) - now)))
        for ch in range(16):  # silence everything before the next rendering (reverb tails too)
            self.synth.cc(ch, 123, 0)
        self._block(self.sr)
        return np.concatenate(out)


def voices_for(work: Work, choice: dict) -> list[Voice]:
    programs = INSTRUMENTS[choice["family"]][1]
    spq = 60.0 / choice["bpm"]  # seconds per quarter note
    voices = []
    for i, part in enumerate(work.parts[:15]):
        notes = part.copy()
        notes[:, 0] *= spq
        notes[:, 1] = np.maximum(notes[:, 1] * spq * 0.95, 0.03)  # a hair of articulation between notes
        notes[:, 2] += choice["transpose"]
        voices.append(Voice(notes, programs[min(i, len(programs) - 1)]))
    return voices


PRE_ROLL_S = 2.0


def window_voices(voices: list[Voice], t0: float, t1: float) -> list[Voice]:
    """The notes of ``voices`` that start in [t0, t1), re-timed so t0 is 0 (voice order and programs kept)."""
    out = []
    for v in voices:
        sel = (v.notes[:, 0] >= t0) & (v.notes[:, 0] < t1)
        notes = v.notes[sel].copy()
        notes[:, 0] -= t0
        out.append(Voice(notes, v.program))
    return out


def clip_starts(work: Work, choice: dict, total_s: float, clip_s: float, max_clips: int) -> list[float]:
    """Non-overlapping clip starts at note onsets (so a clip begins with music), at most ``max_clips``."""
    onsets = np.unique(np.concatenate([p[:, 0] for p in work.parts])) * 60.0 / choice["bpm"]
    starts, nxt = [], 0.0
    for on in onsets:
        if on >= nxt and on + clip_s <= total_s + 1.0:
            starts.append(float(on))
            nxt = on + clip_s
            if len(starts) == max_clips:
                break
    return starts


def clip_facts(work: Work, choice: dict, start: float, clip_s: float) -> dict:
    """Attributes of one clip, measured on its own notes (register of the top voice, note density)."""
    spq = 60.0 / choice["bpm"]
    top = work.parts[0]
    sel = (top[:, 0] * spq >= start) & (top[:, 0] * spq < start + clip_s)
    pitches = top[sel, 2] + choice["transpose"] if sel.any() else top[:, 2] + choice["transpose"]
    all_on = np.concatenate([p[:, 0] for p in work.parts]) * spq
    density = float(((all_on >= start) & (all_on < start + clip_s)).sum() / clip_s)
    tonic = (work.key[0] + choice["transpose"]) % 12
    coll = COLLECTIONS.get(work.collection, (f"a {work.collection} piece", None, "", (60, 160)))
    return {
        "instrument": choice["family"], "tempo": tempo_word(choice["bpm"]), "bpm": choice["bpm"],
        "register": register_word(float(np.median(pitches))), "mode": work.key[1], "key": KEY_NAMES[tonic],
        "metre": work.metre, "texture": texture_word(len(work.parts)), "dynamics": choice["dynamics"],
        "collection": work.collection, "style": coll[0], "composer": coll[1], "era": coll[2],
        "note_density": round(density, 2), "transpose": choice["transpose"],
    }


_TEMPLATES = (
    "{style} played on {inst}, {tempo} at {bpm} BPM, in {key} {mode}",
    "{tempo_adj} {era} music: {style} on {inst}, {key} {mode}, {metre} time",
    "{inst} playing {style} {tempo_phrase}, {register} register, {dyn_adj}",
    "{dyn_adj} {texture} {era} piece for {inst} in {key} {mode}, {bpm} beats per minute",
    "{style} arranged for {inst}; {tempo}, {metre}, {mode} key, {register} register",
    "a {tempo} {mode} piece on {inst}{by}, {texture} texture, {dyn_adj}",
)
_TEMPO_PHRASES = {"slow": ("slowly", "at a slow tempo", "in a slow, calm pace"),
                  "medium": ("at a moderate tempo", "at a walking pace", "at medium speed"),
                  "fast": ("quickly", "at a fast tempo", "briskly and lively")}
_TEMPO_ADJ = {"slow": ("slow", "calm, slow"), "medium": ("moderate", "steady"), "fast": ("fast", "lively, fast")}
_DYN_ADJ = {"soft": ("soft", "quiet", "gentle and soft"), "loud": ("loud", "bold", "strong and loud")}


def make_caption(facts: dict, rng: np.random.Generator) -> str:
    """A caption in one of several templates, built only from ``facts`` (so every word is true)."""
    phrases = INSTRUMENTS[facts["instrument"]][0]
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    text = pick(_TEMPLATES).format(
        style=facts["style"], inst=pick(phrases), tempo=facts["tempo"], bpm=int(round(facts["bpm"])),
        key=facts["key"], mode=facts["mode"], era=facts["era"], metre=facts["metre"], register=facts["register"],
        tempo_phrase=pick(_TEMPO_PHRASES[facts["tempo"]]), tempo_adj=pick(_TEMPO_ADJ[facts["tempo"]]),
        dyn_adj=pick(_DYN_ADJ[facts["dynamics"]]), texture=facts["texture"],
        by=f" by {facts['composer']}" if facts.get("composer") else "",
    )
    return text[0].upper() + text[1:]


def is_val_work(path: str, fraction: float) -> bool:
    """Held-out split by work: a stable hash of the score path (independent of seed, order and workers)."""
    h = int.from_bytes(hashlib.sha1(path.encode()).digest()[:8], "big") / 2**64
    return h < fraction


# ------------------------------------------------------------------------------------------ the corpus

_WORKER: dict = {}


def _init_worker(soundfont: str, sr: int) -> None:
    _WORKER["renderer"] = FluidRenderer(soundfont, sr)


def _render_file(job: tuple) -> tuple[int, list[dict], str | None]:
    """Parse one corpus file and render it ``renderings`` times; returns (job index, clips, skip reason)."""
    index, path, seed, renderings, clip_s, max_clips, out_dir = job
    renderer: FluidRenderer = _WORKER["renderer"]
    try:
        works = parse_works(path)
    except Exception as e:  # music21 fails in many ways on odd scores: skip and count, never crash
        return index, [], f"parse: {type(e).__name__}"
    if not works:
        return index, [], "no notes"
    from fluxmusic.audio import write_audio

    clips: list[dict] = []
    n_clip = int(round(clip_s * renderer.sr))
    for w_i, work in enumerate(works):
        for r in range(renderings):
            rng = np.random.default_rng([seed, index, w_i, r])
            choice = choose_rendering(work, rng)
            velocity, peak = DYNAMICS[choice["dynamics"]]
            voices = voices_for(work, choice)
            total = max(float((v.notes[:, 0] + v.notes[:, 1]).max()) for v in voices)
            for c_i, start in enumerate(clip_starts(work, choice, total, clip_s, max_clips)):
                # Render only this clip's notes, with a pre-roll so notes sounding at the cut ring naturally.
                t0 = max(0.0, start - PRE_ROLL_S)
                audio = renderer.render(window_voices(voices, t0, start + clip_s), velocity,
                                        length_s=start + clip_s - t0)
                a = audio[int(round((start - t0) * renderer.sr)):][:n_clip]
                if len(a) < n_clip * 0.9 or float(np.sqrt(np.mean(a ** 2))) < 1e-3:
                    continue
                a = a * (peak / max(float(np.abs(a).max()), 1e-6))  # loudness follows the dynamics word
                facts = clip_facts(work, choice, start, clip_s)
                rel = f"clips/{index:05d}_{w_i}_{r}_{c_i}.wav"
                write_audio(Path(out_dir) / rel, a.astype(np.float32), renderer.sr)
                clips.append({"path": rel, "caption": make_caption(facts, rng),
                              "duration": round(len(a) / renderer.sr, 4), **facts,
                              "work": work.path.split("/corpus/")[-1], "title": work.title})
    return index, clips, None


def find_soundfont(soundfont: str | os.PathLike | None) -> str:
    if soundfont is not None:
        if not Path(soundfont).is_file():
            raise FluxMusicError(f"SoundFont not found: {soundfont}; {INSTALL_HINT}")
        return str(soundfont)
    for p in DEFAULT_SOUNDFONTS:
        if Path(p).is_file():
            return p
    raise FluxMusicError(f"no General MIDI SoundFont found (looked in {', '.join(DEFAULT_SOUNDFONTS)}); "
                         f"{INSTALL_HINT}")


def render_corpus(out_dir: str | os.PathLike, max_works: int | None = None, collections: tuple[str, ...] | None = None,
                  renderings: int = 1, clips_per_work: int = 3, seed: int = 0, val_fraction: float = 0.05,
                  soundfont: str | None = None, sr: int = 16000, clip_seconds: float = 10.24,
                  workers: int = 1, progress: bool = True, paths: list[str] | None = None) -> Path:
    """Render corpus works to ``out_dir/clips`` and write ``out_dir/manifest.jsonl``; returns the manifest.

    Files are taken in a seeded order (``max_works`` of them, spread over the collections); the output depends
    only on (seed, files, options), not on ``workers``. Returns after writing the manifest atomically.
    """
    try:
        import music21  # noqa: F401
    except ImportError:
        raise FluxMusicError(f"music21 is not installed; {INSTALL_HINT}") from None
    font = find_soundfont(soundfont)
    for name, v, ok in (("renderings", renderings, renderings >= 1), ("clips per work", clips_per_work,
                        clips_per_work >= 1), ("val fraction", val_fraction, 0 <= val_fraction < 1),
                        ("max works", max_works, max_works is None or max_works >= 1)):
        if not ok:
            raise FluxMusicError(f"{name} out of range: {v!r}")
    if paths is None:
        paths = list_corpus(collections)
        order = np.random.default_rng([seed, 0xC0]).permutation(len(paths))
        paths = [paths[i] for i in order][: max_works or len(paths)]
    out = Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    jobs = [(i, p, seed, renderings, clip_seconds, clips_per_work, str(out)) for i, p in enumerate(paths)]
    t0 = time.perf_counter()
    results: list[tuple[int, list[dict], str | None]] = []
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers, _init_worker, (font, sr)) as pool:
            for done, res in enumerate(pool.imap_unordered(_render_file, jobs), start=1):
                results.append(res)
                _progress(progress, done, len(jobs), results, t0, clip_seconds)
    else:
        _init_worker(font, sr)
        try:
            for done, job in enumerate(jobs, start=1):
                results.append(_render_file(job))
                _progress(progress, done, len(jobs), results, t0, clip_seconds)
        finally:
            _WORKER.pop("renderer").close()
    results.sort(key=lambda r: r[0])
    lines, skipped = [], {}
    for _, clips, reason in results:
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        for c in clips:
            c["split"] = "val" if is_val_work(c["work"], val_fraction) else "train"
            lines.append(json.dumps(c, ensure_ascii=False))
    if not lines:
        raise FluxMusicError(f"no clip rendered from {len(paths)} corpus files (skipped: {skipped})")
    manifest = out / "manifest.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, manifest)
    summary = {"files": len(paths), "clips": len(lines), "hours": round(len(lines) * clip_seconds / 3600, 3),
               "skipped": skipped, "seconds": round(time.perf_counter() - t0, 1), "soundfont": Path(font).name}
    (out / "render_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if progress:
        print(f"render: {summary}", file=sys.stderr, flush=True)
    return manifest


def _progress(on: bool, done: int, n: int, results: list, t0: float, clip_s: float) -> None:
    if on and (done == n or done % 25 == 0):
        clips = sum(len(r[1]) for r in results)
        skipped = sum(1 for r in results if r[2])
        el = time.perf_counter() - t0
        print(f"render: {done}/{n} files, {clips} clips ({clips * clip_s / 3600:.2f} h), {skipped} skipped, "
              f"{el:.0f} s, {clips * clip_s / max(el, 1e-9):.0f}x real time", file=sys.stderr, flush=True)

