"""Word-level tokenizers built from corpus captions with the ``tokenizers`` library.

The corpus vocabulary is a few hundred words, so a word-level model is exact and tiny (no subword merges to
learn). Saved as a transformers fast tokenizer, so the model directory loads it with ``AutoTokenizer``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from fluxmusic.errors import FluxMusicError

PAD, UNK, EOS, BOS = "<pad>", "<unk>", "</s>", "<s>"
SPECIALS = [PAD, UNK, EOS, BOS]


def build_caption_tokenizer(captions: Iterable[str], out_dir: str | Path, style: str, model_max_length: int,
                            min_count: int = 1):
    """Train a lowercase word-level tokenizer on ``captions`` and save it under ``out_dir``.

    ``style``: "t5" appends ``</s>`` (T5's convention); "clap" wraps in ``<s> ... </s>`` so the CLAP text
    tower's pooler, which reads the first token, always sees the same start token.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if style not in ("t5", "clap"):
        raise FluxMusicError(f"tokenizer style {style!r}; allowed: t5, clap")
    pre = pre_tokenizers.Whitespace()
    norm = normalizers.Lowercase()
    counts: Counter[str] = Counter()
    for c in captions:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(c)))
    if not counts:
        raise FluxMusicError("no captions to build a tokenizer from")
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):  # frequency order: deterministic
        if n >= min_count:
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    if style == "t5":
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=EOS, bos_token=BOS,
        model_max_length=model_max_length,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def max_tokens(tokenizer, captions: Iterable[str]) -> int:
    """Longest tokenized caption (special tokens included)."""
    return max(len(ids) for ids in tokenizer(list(captions))["input_ids"])
