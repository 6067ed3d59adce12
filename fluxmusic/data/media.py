"""Checkable image-music and story-music pairs for the adapters (issue 18).

No public image-music pairs are reachable offline, so each clip of the rendered corpus gets an image drawn from
the same attributes its caption states, and a story written around them:

- image (64 x 64, numpy + PIL): the background hue follows the **mode** (major: warm, minor: cool), its brightness
  the **register** (low: dark, mid: middle, high: light), the contrast the **dynamics** (soft: pale glyphs); the
  number and size of the glyphs the **tempo** (slow: few and large, fast: many and small, on a jittered grid:
  the rhythm of shapes), the glyph itself the **instrument family** (one shape per family) and the number of glyph
  colours the **texture** (solo 1 ... four-part 4);
- story: several sentences from templates around the same facts, in a random order, with distractor sentences.

Everything is a function of ``(seed, clip index)``, so the pairs are reproducible; the manifest's ``split`` (by
work) decides train and held-out.
"""

from __future__ import annotations

import colorsys

import numpy as np

from fluxmusic.data import render as R

IMAGE_SIZE = 64
FAMILIES = tuple(R.INSTRUMENTS)
#: one glyph per instrument family
GLYPHS = {
    "piano": "square", "organ": "pipe", "strings": "cross_x", "choir": "ring", "woodwinds": "hbar",
    "brass": "triangle", "harp": "diagonal", "guitar": "plus", "harpsichord": "box", "violin": "ellipse",
    "flute": "dot", "mallets": "diamond",
}
_MODE_HUES = {"major": (0.0, 0.16), "minor": (0.5, 0.78)}  # warm reds-yellows vs cool cyans-violets
_REGISTER_VALUE = {"low": 0.22, "mid": 0.5, "high": 0.85}
_TEMPO_GRID = {"slow": 2, "medium": 4, "fast": 6}  # glyphs per side of the grid
_TEXTURE_COLOURS = {"solo": 1, "two-part": 2, "three-part": 3, "four-part": 4}


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1)))


def _glyph(draw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    w = max(1, int(round(r / 3)))
    if kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "box":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], outline=fill, width=w)
    elif kind == "pipe":
        draw.rectangle([cx - r / 3, cy - r * 1.4, cx + r / 3, cy + r * 1.4], fill=fill)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=w)
    elif kind == "dot":
        draw.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=fill)
    elif kind == "ellipse":
        draw.ellipse([cx - r / 2, cy - r * 1.2, cx + r / 2, cy + r * 1.2], fill=fill)
    elif kind == "hbar":
        draw.rectangle([cx - r * 1.3, cy - r / 4, cx + r * 1.3, cy + r / 4], fill=fill)
    elif kind == "diagonal":
        draw.line([cx - r, cy + r, cx + r, cy - r], fill=fill, width=w)
    elif kind == "plus":
        draw.line([cx - r, cy, cx + r, cy], fill=fill, width=w)
        draw.line([cx, cy - r, cx, cy + r], fill=fill, width=w)
    elif kind == "cross_x":
        draw.line([cx - r, cy - r, cx + r, cy + r], fill=fill, width=w)
        draw.line([cx - r, cy + r, cx + r, cy - r], fill=fill, width=w)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # pragma: no cover - GLYPHS is closed
        raise ValueError(kind)


def render_image(attrs: dict, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """The image of a clip's attributes: RGB uint8 [size, size, 3]."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    lo, hi = _MODE_HUES.get(attrs.get("mode"), (0.3, 0.4))
    hue = rng.uniform(lo, hi)
    value = _REGISTER_VALUE.get(attrs.get("register"), 0.5) + rng.uniform(-0.06, 0.06)
    soft = attrs.get("dynamics") == "soft"
    bg = _rgb(hue, 0.55 + rng.uniform(-0.1, 0.1), value)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    n = _TEMPO_GRID.get(attrs.get("tempo"), 4)
    cell = size / n
    r = cell * (0.32 if n > 2 else 0.26) * rng.uniform(0.9, 1.1)
    kind = GLYPHS.get(attrs.get("instrument"), "dot")
    colours = []
    for k in range(_TEXTURE_COLOURS.get(attrs.get("texture"), 1)):
        # glyphs contrast with the background: dark on light, light on dark; soft dynamics -> low contrast
        step = 0.2 if soft else 0.45
        gv = value - step if value > 0.5 else value + step
        colours.append(_rgb(hue + 0.5 + 0.12 * k, 0.3 if soft else 0.85, gv))
    for i in range(n):
        for j in range(n):
            cx = (j + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
            cy = (i + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
            _glyph(draw, kind, cx, cy, r, colours[(i + j) % len(colours)])
    a = np.asarray(img, dtype=np.float32)
    a += rng.normal(0, 4.0, a.shape)  # a little sensor noise: the tower must not key on exact colours
    return np.clip(a, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ stories
_DISTRACTORS = (
    "The rain had stopped an hour before.", "Someone left a blue umbrella by the door.",
    "The train to the coast was late again.", "A cat slept on the windowsill.",
    "Nobody remembered who had brought the cake.", "The old clock in the corridor was broken.",
    "Outside, the market was closing for the night.", "Her brother was reading a newspaper.",
    "The walls were painted a faded green.", "It was the third Tuesday of the month.",
    "A delivery van honked twice in the street.", "The tea had gone cold on the table.",
)
_OPENINGS = ("That evening the hall filled slowly.", "We arrived just as the lights dimmed.",
             "It began without any announcement.", "I still remember that afternoon.")


def _facts(attrs: dict, rng: np.random.Generator) -> list[str]:
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    fam = attrs.get("instrument")
    facts = []
    if fam in R.INSTRUMENTS:
        inst = pick(R.INSTRUMENTS[fam][0])
        facts.append(pick((f"The music was played on {inst}.", f"Then the {inst} started to play.",
                           f"All we could hear was the {inst}.")))
    tempo = attrs.get("tempo")
    if tempo in R._TEMPO_ADJ:
        adj, phrase = pick(R._TEMPO_ADJ[tempo]), pick(R._TEMPO_PHRASES[tempo])
        s = pick((f"It moved {phrase}.", f"The pace was {adj}.", f"A {adj} piece, it went on {phrase}."))
        if attrs.get("bpm") and rng.random() < 0.5:
            s = s[:-1] + f", about {round(float(attrs['bpm']))} beats per minute."
        facts.append(s)
    reg = attrs.get("register")
    if reg in ("low", "mid", "high"):
        word = "middle" if reg == "mid" and rng.random() < 0.5 else reg
        facts.append(pick((f"The melody stayed in the {word} register.", f"Everything sat in a {word} register.")))
    mode = attrs.get("mode")
    if mode in ("major", "minor"):
        key = attrs.get("key")
        facts.append(f"It was in {key} {mode}." if key and rng.random() < 0.5 else
                     pick((f"The tune was in a {mode} key.", f"You could tell it was {mode}.")))
    dyn = attrs.get("dynamics")
    if dyn in R._DYN_ADJ:
        facts.append(pick((f"The sound was {pick(R._DYN_ADJ[dyn])}.", f"It was {pick(R._DYN_ADJ[dyn])} throughout.")))
    tex = attrs.get("texture")
    if tex:
        facts.append(pick((f"It was a {tex} texture.", f"The writing was {tex}.")))
    if attrs.get("style") and rng.random() < 0.6:
        facts.append(f"It sounded like {attrs['style']}.")
    return facts


def make_story(attrs: dict, seed: int) -> str:
    """A story of several sentences stating the clip's facts, in a random order, among distractors."""
    rng = np.random.default_rng(seed)
    facts = _facts(attrs, rng)
    n_distract = int(rng.integers(2, 5))
    distract = [str(s) for s in rng.choice(_DISTRACTORS, size=n_distract, replace=False)]
    body = facts + distract
    rng.shuffle(body)
    return " ".join([str(_OPENINGS[int(rng.integers(len(_OPENINGS)))]), *body])


def pair_seed(seed: int, index: int, variant: int = 0) -> int:
    """The seed of clip ``index``'s image / story (variant > 0: augmented renders for training)."""
    return int(np.random.SeedSequence([seed, index, variant]).generate_state(1)[0])
