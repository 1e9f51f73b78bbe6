"""Keeping user-typed paths inside allowed folders, and turning free text into a usable output name.

When the WebUI listens beyond localhost (``--listen``, ``--share``, ``--server-name``) anyone who can
reach it may type a path into the tab. :func:`confine` then accepts only paths inside configured roots:
real paths (symlinks resolved) compared with a trailing separator, so ``/data/images_private`` is not
inside ``/data/images``, and any ``..`` is refused outright.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lib_lora_trainer.config import output_name_problem

logger = logging.getLogger(__name__)


class PathNotAllowedError(ValueError):
    """A path the user typed lies outside the folders this WebUI allows."""


def _real(path: str | Path) -> str:
    return os.path.normcase(os.path.realpath(os.path.expanduser(str(path))))


def _has_parent_reference(path: str | Path) -> bool:
    return any(part == ".." for part in re.split(r"[\\/]+", str(path)))


def is_inside(path: str | Path, root: str | Path) -> bool:
    """True when the real ``path`` is ``root`` itself or lies below it (symlinks resolved on both)."""
    real_path, real_root = _real(path), _real(root)
    if real_path == real_root:
        return True
    prefix = real_root if real_root.endswith(os.sep) else real_root + os.sep
    return real_path.startswith(prefix)


def confine(path: str | Path, roots: Iterable[str | Path]) -> Path:
    """Return the real path of ``path`` if it lies inside one of ``roots``; raise otherwise.

    Raises :class:`PathNotAllowedError` with a message that names the allowed roots.
    """
    root_list = [Path(root) for root in roots if str(root).strip()]
    text = str(path).strip()
    allowed = ", ".join(str(root) for root in root_list) or "(none configured)"
    if not text:
        raise _refuse("no folder was given", allowed)
    if _has_parent_reference(text):
        raise _refuse(f"'{text}' contains '..'; give the folder without '..'", allowed)
    if not root_list:
        raise _refuse(f"'{text}' cannot be used: no allowed folders are configured", allowed)
    for root in root_list:
        if is_inside(text, root):
            return Path(os.path.realpath(os.path.expanduser(text)))
    raise _refuse(f"'{text}' is outside the allowed folders", allowed)


def _refuse(reason: str, allowed: str) -> PathNotAllowedError:
    message = (
        f"{reason}. This WebUI is reachable from other machines, so only these folders may be used: "
        f"{allowed}. Move the files there, or on a trusted network start the WebUI with "
        "--enable-insecure-extension-access."
    )
    logger.warning(message)
    return PathNotAllowedError(message)


@dataclass(frozen=True)
class PathPolicy:
    """Whether user paths are confined (the WebUI is non-local) and to which roots."""

    confined: bool = False
    roots: tuple[Path, ...] = field(default_factory=tuple)

    @classmethod
    def create(cls, confined: bool, roots: Sequence[str | Path]) -> PathPolicy:
        return cls(confined=confined, roots=tuple(Path(root) for root in roots if str(root).strip()))

    def check(self, path: str | Path) -> Path:
        """The path to use: confined when the policy says so, else simply expanded (``~``)."""
        if self.confined:
            return confine(path, self.roots)
        text = str(path).strip()
        if not text:
            raise PathNotAllowedError("no folder was given")
        return Path(os.path.expanduser(text))


def safe_relative_subfolder(subfolder: str) -> Path:
    """A settings subfolder ('character_trainer', 'loras/people') as a relative path, never escaping.

    Absolute paths, drive letters and '..' are refused with a clear message.
    """
    text = subfolder.strip().strip("/\\")
    if not text:
        return Path()
    if _has_parent_reference(text) or os.path.isabs(subfolder.strip()) or re.match(r"^[A-Za-z]:", text):
        message = f"subfolder {subfolder!r} must be a folder name inside the Lora folder (no '..', no drive)"
        logger.warning(message)
        raise PathNotAllowedError(message)
    return Path(*[part for part in re.split(r"[\\/]+", text) if part and part != "."])


def suggest_output_name(text: str, fallback: str = "my_character") -> str:
    """Turn free text ('Alice Smith (v2)') into a valid LoRA file stem ('Alice_Smith_v2').

    The result always passes :func:`lib_lora_trainer.config.output_name_problem`.
    """
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", text.strip())
    cleaned = re.sub(r"\.{2,}", ".", cleaned)
    cleaned = re.sub(r"_{2,}", "_", cleaned).strip("._-")
    if output_name_problem(cleaned) is None:
        return cleaned
    return fallback
