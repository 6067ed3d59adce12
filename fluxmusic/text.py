"""Text conditioning: T5 tokens (fine-grained) and the pooled CLAP vector (coarse)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fluxmusic.errors import FluxMusicError
from fluxmusic.flow import Conditioning

T5_MAX_LENGTH = 256
CLAP_MAX_LENGTH = 77


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """One prompt or a list of them; each a non-empty string."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise FluxMusicError("no prompt given; pass at least one non-empty prompt")
    for i, p in enumerate(items):
        if not isinstance(p, str) or not p.strip():
            raise FluxMusicError(f"prompt {i} is {p!r}; a prompt must be a non-empty string")
    return items


class TextEncoders:
    """Tokenize and encode with T5 and the CLAP text tower.

    ``t5_fn(input_ids)`` and ``clap_fn(input_ids, attention_mask)`` run the encoders; a backend may supply
    them (ONNX, TensorRT). As in the official code, T5 sees the padded ids without an attention mask and
    CLAP gets its mask; T5 pads to 256 tokens, CLAP to 77.
    """

    def __init__(
        self,
        t5_tokenizer,
        clap_tokenizer,
        t5_fn: Callable[[Tensor], Tensor],
        clap_fn: Callable[[Tensor, Tensor], Tensor],
        t5_max_length: int = T5_MAX_LENGTH,
        clap_max_length: int = CLAP_MAX_LENGTH,
    ) -> None:
        self.t5_tokenizer, self.clap_tokenizer = t5_tokenizer, clap_tokenizer
        self.t5_fn, self.clap_fn = t5_fn, clap_fn
        self.t5_max_length, self.clap_max_length = t5_max_length, clap_max_length
        self.calls = 0  # how many batches were encoded: tests assert the null branch runs no encoder

    def tokenize_t5(self, prompts: list[str]) -> Tensor:
        enc = self.t5_tokenizer(
            prompts, max_length=self.t5_max_length, padding="max_length", truncation=True, return_tensors="pt"
        )
        return enc["input_ids"]

    def tokenize_clap(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        enc = self.clap_tokenizer(
            prompts, max_length=self.clap_max_length, padding="max_length", truncation=True, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """Prompts (empty strings allowed: that is the null condition) -> Conditioning(txt, y) in fp32."""
        self.calls += 1
        txt = self.t5_fn(self.tokenize_t5(prompts))
        ids, mask = self.tokenize_clap(prompts)
        y = self.clap_fn(ids, mask)
        return Conditioning(txt.float(), y.float())


def torch_t5_fn(model) -> Callable[[Tensor], Tensor]:
    device = next(model.parameters()).device

    def run(input_ids: Tensor) -> Tensor:
        return model(input_ids=input_ids.to(device)).last_hidden_state

    return run


def torch_clap_fn(model) -> Callable[[Tensor, Tensor], Tensor]:
    device = next(model.parameters()).device

    def run(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).pooler_output

    return run
