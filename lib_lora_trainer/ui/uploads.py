"""Uploads that are what the browser uploaded, never a server path the client names.

gradio 3.41's File component takes ``{"name": PATH, "is_file": true}`` from the client and copies PATH
into its temporary folder, whatever PATH is: anyone who can reach the page could have the server read
``/etc/...`` or another user's files as a "settings file". A real upload always lies in the folder gradio's
``/upload`` route writes to; :class:`UploadFile` accepts only those and turns anything else into a
:class:`RefusedUpload`, which the handler reports as a sentence.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from lib_lora_trainer.paths import is_inside

logger = logging.getLogger(__name__)


def upload_folder() -> Path:
    """Where gradio's ``/upload`` route puts uploaded files (``routes.App.uploaded_file_dir``)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


@dataclass(frozen=True)
class RefusedUpload:
    """A file reference from the client that is not an upload; ``name`` is what the client sent."""

    name: str

    @property
    def message(self) -> str:
        return (
            f"'{Path(self.name).name}' was not uploaded through the file box; choose the file with the "
            "upload button."
        )


def is_upload(path: str) -> bool:
    """True when ``path`` (symlinks resolved) lies inside gradio's upload folder."""
    return bool(path) and ".." not in Path(path).parts and is_inside(path, upload_folder())


class UploadFile(gr.File):
    """``gr.File`` that refuses a client-named server path before gradio copies it."""

    is_template = True  # the page renders it as gradio's own File (get_block_name: the base class)

    def preprocess(self, x: Any) -> Any:
        items = x if isinstance(x, list) else [x]
        for item in items:
            if isinstance(item, dict) and item.get("is_file") and not is_upload(str(item.get("name", ""))):
                logger.warning("refused an upload that names the server path %r", item.get("name"))
                return RefusedUpload(str(item.get("name", "")))
        return super().preprocess(x)
