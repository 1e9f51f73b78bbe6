"""The last submitted form, kept in a JSON file so a reloaded page (or a restarted WebUI) shows it again.

Only the form's fields are kept (:data:`~lib_lora_trainer.ui.form.FIELDS`), by name; a key a later
version dropped is ignored and a field added since keeps its default, so an old file never blocks the tab.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lib_lora_trainer.config import ConfigError, TrainingConfig
from lib_lora_trainer.files import atomic_write_text
from lib_lora_trainer.ui.form import FIELD_NAMES

logger = logging.getLogger(__name__)


class FormMemory:
    """Reads and writes the last submitted form at ``path`` (nothing is kept when ``path`` is None)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._last: dict | None = None

    def save(self, config: TrainingConfig) -> None:
        if self.path is None:
            return
        values = {name: getattr(config, name) for name in FIELD_NAMES}
        if values == self._last:
            return
        try:
            atomic_write_text(self.path, json.dumps(values, indent=1, ensure_ascii=False))
            self._last = values
        except OSError as error:  # the form still works; only the memory of it is lost
            logger.warning("the last form could not be saved to %s: %s", self.path, error)

    def load(self, base: TrainingConfig) -> TrainingConfig | None:
        """The remembered form over ``base``; None when there is none or it cannot be read."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            known = {name: value for name, value in data.items() if name in FIELD_NAMES}
            return TrainingConfig.from_dict({**base.to_dict(), **known})
        except (OSError, ValueError, ConfigError) as error:
            logger.warning("the last form in %s was not restored: %s", self.path, error)
            return None
