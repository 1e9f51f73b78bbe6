"""Which training images a held-out share keeps out of training, for the validation loss.

The pick depends only on the images' names, never on the order a folder lists them in: every image gets
a rank from a hash of its file name (its path inside its folder) and the lowest ranks are held out. So
a run, its resume and the next run on the same folder hold out the same images, and adding an image
changes the pick only where the new image ranks lower or the count grows. The file name alone (not the
folder's name) is hashed so that renaming ``10_alice`` to ``20_alice`` to change the repeats keeps
the split.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

_SALT = b"lora-trainer held-out images\0"


def held_out_count(share: float, image_count: int) -> int:
    """How many of a folder's ``image_count`` images ``share`` holds out: the share rounded (half up),
    at least 1 when the share is above 0, and never every image; a single image is never held out."""
    if share <= 0 or image_count < 2:
        return 0
    return min(image_count - 1, max(1, math.floor(share * image_count + 0.5)))


def held_out_names(names: Iterable[str], share: float) -> set[str]:
    """The names (paths inside one folder) of the images ``share`` holds out of that folder."""
    unique = sorted(set(names))
    ranked = sorted(unique, key=lambda name: (_rank(name), name))
    return set(ranked[: held_out_count(share, len(unique))])


def _rank(name: str) -> bytes:
    return hashlib.sha256(_SALT + name.encode("utf-8", "surrogatepass")).digest()
