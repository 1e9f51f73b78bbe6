"""Caption handling shared by the scan, the training batches and the caption editor.

A caption is a comma-separated list of tags. At training time the trigger word is put first (never
written to the user's files), then, per step and as kohya's ``process_caption`` does: the whole caption
may be dropped (``caption_dropout_rate``); otherwise the tags after the first ``keep_tokens`` are
shuffled (``shuffle_caption``) and each may be dropped (``caption_tag_dropout_rate``).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def tag_key(tag: str) -> str:
    """How tags are compared: case and runs of spaces do not matter."""
    return " ".join(tag.lower().split())


def has_tag(caption: str, tag: str) -> bool:
    key = tag_key(tag)
    return any(tag_key(existing) == key for existing in split_tags(caption))


def put_trigger_first(caption: str, trigger_word: str) -> str:
    """``caption`` with ``trigger_word`` as its first tag (moved there if present elsewhere).

    A trigger written as several tags ("ohwx, woman") puts all of them first, in that order.
    """
    trigger_tags = split_tags(trigger_word)
    keys = {tag_key(tag) for tag in trigger_tags}
    rest = [tag for tag in split_tags(caption) if tag_key(tag) not in keys]
    return join_tags([*trigger_tags, *rest])


def has_trigger(caption: str, trigger_word: str) -> bool:
    """True when every tag of ``trigger_word`` is in ``caption``."""
    return all(has_tag(caption, tag) for tag in split_tags(trigger_word))


def count_tags(captions: Iterable[str]) -> dict[str, int]:
    """Tag frequency the way kohya writes ``ss_tag_frequency``: lower-cased, most frequent first."""
    counts = Counter(tag.lower() for caption in captions for tag in split_tags(caption))
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


@dataclass(frozen=True)
class CaptionAugmentation:
    shuffle: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0

    @property
    def varies(self) -> bool:
        return self.shuffle or self.caption_dropout_rate > 0 or self.tag_dropout_rate > 0


def augment_caption(caption: str, settings: CaptionAugmentation, rng: random.Random) -> str:
    """One training-time variant of ``caption`` (already carrying the trigger word first)."""
    if settings.caption_dropout_rate > 0 and rng.random() < settings.caption_dropout_rate:
        return ""
    if not (settings.shuffle or settings.tag_dropout_rate > 0):
        return caption
    tags = split_tags(caption)
    fixed, flexible = tags[: settings.keep_tokens], tags[settings.keep_tokens :]
    if settings.shuffle:
        rng.shuffle(flexible)
    if settings.tag_dropout_rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= settings.tag_dropout_rate]
    return join_tags(fixed + flexible)
