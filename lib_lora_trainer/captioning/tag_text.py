"""Tags as text: comma lists, underscores, kaomoji, and merging new tags with an existing caption."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from enum import Enum

# Danbooru tags whose underscores are part of a face, not word separators ("^_^" must not become "^ ^").
KAOMOJI = frozenset(
    {
        "0_0",
        "(o)_(o)",
        "+_+",
        "+_-",
        "._.",
        "<o>_<o>",
        "<|>_<|>",
        "=_=",
        ">_<",
        "3_3",
        "6_9",
        ">_o",
        "@_@",
        "^_^",
        "o_o",
        "u_u",
        "x_x",
        "|_|",
        "||_||",
    }
)

_SEPARATORS = re.compile(r"[,\n\r]+")


class ExistingCaptionMode(str, Enum):
    """What to do with an image that already has a (non-empty) caption file."""

    SKIP = "skip"  # leave it exactly as it is
    APPEND = "append"  # keep the user's tags, add the new ones after them
    PREPEND = "prepend"  # new tags first, then the user's
    OVERWRITE = "overwrite"  # replace it (the old file is backed up)

    @classmethod
    def parse(cls, value: str | ExistingCaptionMode) -> ExistingCaptionMode:
        try:
            return cls(value.value if isinstance(value, cls) else str(value).strip().lower())
        except ValueError:
            choices = ", ".join(mode.value for mode in cls)
            raise ValueError(f"Unknown existing-caption mode '{value}'. Choose one of: {choices}") from None


def parse_tag_list(text: str | None) -> list[str]:
    """Tags from a comma (or line) separated list; spaces around commas and empty entries don't matter."""
    if not text:
        return []
    return [" ".join(part.split()) for part in _SEPARATORS.split(text) if part.strip()]


def tag_key(tag: str) -> str:
    """The form two tags are compared in: "Long_Hair", "long hair" and " long  hair " are one tag."""
    return " ".join(tag.replace("_", " ").split()).casefold()


def is_kaomoji(tag: str) -> bool:
    # Short tags with an underscore are faces too ("u_u"); kohya keeps every tag of 3 characters or fewer.
    return tag in KAOMOJI or ("_" in tag and len(tag) <= 3)


def display_tag(tag: str, replace_underscores: bool = True) -> str:
    """A model tag as it goes into a caption: "long_hair" -> "long hair", "^_^" unchanged."""
    if not replace_underscores or is_kaomoji(tag):
        return tag
    return tag.replace("_", " ")


def without_tags(tags: Iterable[str], unwanted: Iterable[str]) -> list[str]:
    unwanted_keys = {tag_key(tag) for tag in unwanted}
    return [tag for tag in tags if tag_key(tag) not in unwanted_keys]


def unique_tags(tags: Iterable[str]) -> list[str]:
    """``tags`` without repeats (compared with :func:`tag_key`), keeping the first spelling and order."""
    seen: set[str] = set()
    kept = []
    for tag in tags:
        key = tag_key(tag)
        if key and key not in seen:
            seen.add(key)
            kept.append(tag)
    return kept


def compose_caption(
    trigger_tags: Sequence[str],
    new_tags: Sequence[str],
    existing_tags: Sequence[str],
    mode: ExistingCaptionMode,
) -> list[str]:
    """The tags of the caption to write: trigger word(s) always first, then per ``mode``.

    ``SKIP`` and ``OVERWRITE`` ignore ``existing_tags`` (the caller skips an image with a caption in
    ``SKIP`` mode; one without a caption gets the new tags).
    """
    if mode is ExistingCaptionMode.APPEND:
        body = [*existing_tags, *new_tags]
    elif mode is ExistingCaptionMode.PREPEND:
        body = [*new_tags, *existing_tags]
    else:
        body = list(new_tags)
    return unique_tags([*trigger_tags, *body])


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)
