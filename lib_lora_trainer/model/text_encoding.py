"""Captions to conditioning, as training needs it: literal by default, 75-token chunks, clip skip ours.

A1111's prompt encoder (``FrozenCLIPEmbedderWithCustomWords``) reads emphasis, ``BREAK`` and
textual-inversion names out of every text, and takes clip skip from the WebUI's settings. Training does
the encoding itself, with the same tokenizer and transformer and the same chunk layout, so that:

* a caption is plain text unless weighted captions are on (:mod:`~lib_lora_trainer.dataset.prompt_syntax`);
  a caption without prompt syntax gives exactly the tensor A1111's encoder gives for it;
* captions longer than 75 tokens are never cut: like A1111 at generation time, every 75 tokens become one
  77-token chunk (BOS, 75 tokens padded with EOS, EOS), the chunks' outputs side by side; a batch is
  padded with empty chunks to its longest caption. ``ss_max_token_length`` records the longest caption
  trained (None while every caption fits one chunk, as kohya writes its 75-token default);
* textual-inversion embedding names are ordinary words here: a caption trains the same with or without
  the embedding files, and the LoRA does not depend on them;
* clip skip comes from the run's settings (``hidden_states[-N]`` then the final layer norm, as A1111 and
  kohya do), so nothing is written into the WebUI's settings for the run.

Weighted captions follow A1111 exactly: its parser, a chunk per ``BREAK``, each token's output multiplied
by its weight and the mean restored ("Original" emphasis), each caption on its own (as a prompt is
encoded alone), so a caption trains as the same text typed as a prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from lib_lora_trainer.dataset.prompt_syntax import BREAK, literal_text, parse_weighted

CHUNK_LENGTH = 75  # tokens of text per chunk; with BOS and EOS a chunk is 77 tokens
COMMA_PADDING_BACKTRACK = 20  # A1111's default: a chunk may end at a comma up to 20 tokens back

Pieces = list[tuple[str, float]]
Emphasis = Callable[[torch.Tensor, torch.Tensor, list[list[int]]], torch.Tensor]


class CaptionTokenizer(Protocol):
    """The tokenizer as the encoder uses it: text pieces to ids, no special tokens, no truncation."""

    bos_token_id: int
    eos_token_id: int
    comma_token_id: int | None

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]: ...


class ClipTokenizerView:
    """:class:`CaptionTokenizer` over a transformers ``CLIPTokenizer`` (A1111's ``wrapped.tokenizer``)."""

    def __init__(self, tokenizer, comma_token_id: int | None = None):
        self._tokenizer = tokenizer
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.comma_token_id = (
            comma_token_id if comma_token_id is not None else tokenizer.get_vocab().get(",</w>")
        )

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tokenizer(list(texts), truncation=False, add_special_tokens=False)["input_ids"]


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)


def original_emphasis(z: torch.Tensor, multipliers: torch.Tensor, tokens: list[list[int]]) -> torch.Tensor:
    """A1111's "Original" emphasis (and kohya's weighted captions): scale each token's output by its
    weight, then restore the mean the output had before."""
    mean_before = z.mean()
    z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    return z * (mean_before / z.mean())


def build_chunks(
    pieces: Sequence[tuple[list[int] | None, float]],
    *,
    bos: int,
    eos: int,
    comma: int | None,
    backtrack: int = COMMA_PADDING_BACKTRACK,
    length: int = CHUNK_LENGTH,
) -> list[Chunk]:
    """Token pieces (``None`` = BREAK) to 77-token chunks laid out as A1111 lays out a prompt.

    A chunk is full at ``length`` tokens; when it fills up and a comma came at most ``backtrack`` tokens
    before, the tokens after that comma move on to the next chunk, so a tag is not split across chunks.
    """
    chunks: list[Chunk] = []
    current = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal current, last_comma
        padding = length - len(current.tokens)
        tokens = current.tokens + [eos] * max(0, padding)
        multipliers = current.multipliers + [1.0] * max(0, padding)
        chunks.append(Chunk([bos, *tokens, eos], [1.0, *multipliers, 1.0]))
        current, last_comma = Chunk(), -1

    for ids, weight in pieces:
        if ids is None:
            close()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(current.tokens)
            elif (
                backtrack
                and len(current.tokens) == length
                and last_comma != -1
                and len(current.tokens) - last_comma <= backtrack
            ):
                split = last_comma + 1
                moved = Chunk(current.tokens[split:], current.multipliers[split:])
                current = Chunk(current.tokens[:split], current.multipliers[:split])
                close()
                current = moved
            if len(current.tokens) == length:
                close()
            current.tokens.append(token)
            current.multipliers.append(weight)
    if current.tokens or not chunks:
        close()
    return chunks


def empty_chunk(bos: int, eos: int, length: int = CHUNK_LENGTH) -> Chunk:
    return Chunk([bos] + [eos] * (length + 1), [1.0] * (length + 2))


class CaptionEncoder:
    """Encodes captions with ``transformer`` (a transformers ``CLIPTextModel``) as described above.

    ``parse`` and ``emphasis`` are the weighted-captions reading (A1111's own inside A1111, ours
    elsewhere); ``before_chunk`` runs before each transformer call (A1111: clear pending TI fixes).
    """

    def __init__(
        self,
        transformer: nn.Module,
        tokenizer: CaptionTokenizer,
        *,
        clip_skip: int = 1,
        weighted: bool = False,
        parse: Callable[[str], Pieces] = parse_weighted,
        emphasis: Emphasis = original_emphasis,
        backtrack: int = COMMA_PADDING_BACKTRACK,
        before_chunk: Callable[[], None] | None = None,
    ):
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.clip_skip = clip_skip
        self.weighted = weighted
        self.parse = parse
        self.emphasis = emphasis
        self.backtrack = backtrack
        self.before_chunk = before_chunk
        self.longest_chunks = 0  # over every caption encoded so far

    def chunks_of(self, caption: str) -> list[Chunk]:
        pieces = self.parse(caption) if self.weighted else [(literal_text(caption), 1.0)]
        texts = [text for text, weight in pieces if not (text == BREAK and weight == -1)]
        token_lists = iter(self.tokenizer.tokenize(texts) if texts else [])
        token_pieces = [
            (None, 1.0) if text == BREAK and weight == -1 else (next(token_lists), weight)
            for text, weight in pieces
        ]
        return build_chunks(
            token_pieces,
            bos=self.tokenizer.bos_token_id,
            eos=self.tokenizer.eos_token_id,
            comma=self.tokenizer.comma_token_id,
            backtrack=self.backtrack,
        )

    def max_token_length(self) -> int | None:
        """kohya's ``max_token_length`` for what was encoded: None while every caption fit 75 tokens."""
        return CHUNK_LENGTH * self.longest_chunks if self.longest_chunks > 1 else None

    def __call__(self, captions: Sequence[str], device: torch.device) -> torch.Tensor:
        per_caption = [self.chunks_of(caption) for caption in captions]
        count = max(len(chunks) for chunks in per_caption)
        self.longest_chunks = max(self.longest_chunks, count)
        empty = empty_chunk(self.tokenizer.bos_token_id, self.tokenizer.eos_token_id)
        outputs = []
        for index in range(count):
            batch = [chunks[index] if index < len(chunks) else empty for chunks in per_caption]
            tokens = [chunk.tokens for chunk in batch]
            z = self._transformer_output(torch.tensor(tokens, dtype=torch.long, device=device))
            if self.weighted:
                z = torch.cat(
                    [
                        self.emphasis(z[row : row + 1], _multipliers(chunk, z.device), [chunk.tokens])
                        for row, chunk in enumerate(batch)
                    ]
                )
            outputs.append(z)
        return torch.cat(outputs, dim=1)

    def _transformer_output(self, ids: torch.Tensor) -> torch.Tensor:
        if self.before_chunk is not None:
            self.before_chunk()
        if self.clip_skip <= 1:
            return self.transformer(input_ids=ids).last_hidden_state
        hidden = self.transformer(input_ids=ids, output_hidden_states=True).hidden_states[-self.clip_skip]
        return self.transformer.text_model.final_layer_norm(hidden)


def _multipliers(chunk: Chunk, device: torch.device) -> torch.Tensor:
    return torch.tensor([chunk.multipliers], dtype=torch.float32, device=device)
