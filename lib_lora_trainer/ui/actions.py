"""What each button of the tab does, without gradio: plain functions over the form's config.

Every path typed by the user passes the host's :class:`~lib_lora_trainer.paths.PathPolicy` first;
every failure comes back as a sentence for the user (and is logged), never as a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lib_lora_trainer.captioning import (
    DEFAULT_MODEL,
    WD14_MODELS,
    ExistingCaptionMode,
    TaggerModelError,
    TaggerModelUnavailable,
    TaggingOptions,
    WD14Tagger,
    tag_folder,
)
from lib_lora_trainer.captioning.wd14_models import (
    DEFAULT_CHARACTER_THRESHOLD,
    FALLBACK_GENERAL_THRESHOLD,
    ensure_model_files,
    installed_models,
)
from lib_lora_trainer.config import ConfigError, TrainingConfig, output_name_problem
from lib_lora_trainer.dataset.caption_editor import CaptionedImage, CaptionEditError, CaptionEditor
from lib_lora_trainer.dataset.crop import preview_crop
from lib_lora_trainer.dataset.images import ImageLoadError
from lib_lora_trainer.dataset.report import build_report
from lib_lora_trainer.dataset.scan import scan_dataset
from lib_lora_trainer.evaluation.scoring import load_scores
from lib_lora_trainer.files import read_text_file
from lib_lora_trainer.outputs.compare import (
    DEFAULT_WEIGHTS,
    ComparisonError,
    EpochComparison,
    build_comparison,
    to_infotext,
)
from lib_lora_trainer.outputs.registry import RUN_CONFIG_SUFFIX, RunOutputs
from lib_lora_trainer.paths import PathNotAllowedError, safe_relative_subfolder
from lib_lora_trainer.sd_scripts_import import load_kohya_config
from lib_lora_trainer.ui.jobs import JobRefused, TrainingJobs
from lib_lora_trainer.ui.services import GridResult, GridSettings, HostServices

logger = logging.getLogger(__name__)

MAX_CROP_PREVIEWS = 12
USER_ERRORS = (ConfigError, PathNotAllowedError, CaptionEditError, ValueError, OSError)


class ActionError(ValueError):
    """An action could not be done; the message is for the user."""


@dataclass(frozen=True)
class ScanResult:
    report_text: str
    previews: list[tuple[Image.Image, str]]


@dataclass(frozen=True)
class EpochEntry:
    epoch: int
    stem: str
    model_path: Path
    preview_path: Path | None
    notes: str


@dataclass(frozen=True)
class TaggerChoice:
    model: str
    general_threshold: float
    character_threshold: float
    undesired_tags: str = ""
    existing_captions: str = ExistingCaptionMode.SKIP.value
    include_rating: bool = False
    replace_underscores: bool = True


def tagger_models(models_dir: str | Path = "") -> list[str]:
    """The models to offer: those already in ``models_dir`` (built-in or placed by hand), then the
    built-in ones that would be downloaded."""
    installed = installed_tagger_models(models_dir)
    return installed + [name for name in WD14_MODELS if name not in installed]


def installed_tagger_models(models_dir: str | Path) -> list[str]:
    """WD14 models whose files are already below ``models_dir`` (usable offline), by name."""
    return list(installed_models(models_dir))


def default_tagger_model(models_dir: str | Path) -> str:
    installed = installed_tagger_models(models_dir)
    return installed[0] if installed else DEFAULT_MODEL


def default_tagger_thresholds(model: str) -> tuple[float, float]:
    info = WD14_MODELS.get(model)
    if info is None:  # a model placed by hand: the thresholds most front ends start from
        return FALLBACK_GENERAL_THRESHOLD, DEFAULT_CHARACTER_THRESHOLD
    return info.general_threshold, info.character_threshold


class TabActions:
    """The tab's behaviour over one :class:`HostServices` and the process's training job."""

    def __init__(self, services: HostServices, jobs: TrainingJobs):
        self.services = services
        self.jobs = jobs

    # --- paths --------------------------------------------------------------------------------------
    def checked_dataset(self, config: TrainingConfig) -> TrainingConfig:
        """``config`` with its dataset folders checked by the path policy (real paths when confined)."""
        policy = self.services.path_policy()
        changes = {"train_data_dir": str(policy.check(config.train_data_dir))}
        if config.reg_data_dir.strip():
            changes["reg_data_dir"] = str(policy.check(config.reg_data_dir))
        return dataclasses.replace(config, **changes)

    def output_folder(self) -> Path:
        roots = self.services.lora_roots()
        if not roots:
            raise ActionError("The WebUI has no Lora folder configured.")
        return roots[0] / safe_relative_subfolder(self.services.defaults().lora_subfolder)

    # --- dataset ------------------------------------------------------------------------------------
    def scan(self, config: TrainingConfig) -> ScanResult:
        config = self.checked_dataset(config)
        if not Path(config.train_data_dir).is_dir():
            raise ActionError(f"The folder {config.train_data_dir} does not exist.")
        dataset = scan_dataset(config)
        report = build_report(dataset, config)
        previews = []
        finder = self.services.face_finder() if config.crop_mode == "face" else None
        for subset in dataset.train_subsets:
            for record in subset.images:
                if len(previews) >= MAX_CROP_PREVIEWS:
                    break
                try:
                    image = preview_crop(record.path, config, face_finder=finder)
                except ImageLoadError as error:
                    logger.warning("no crop preview for %s: %s", record.path.name, error)
                    continue
                previews.append((image, f"{record.path.name} -> {image.width}x{image.height}"))
        return ScanResult(report.text(), previews)

    # --- captions -----------------------------------------------------------------------------------
    def caption_editor(self, config: TrainingConfig) -> CaptionEditor:
        config = self.checked_dataset(config)
        return CaptionEditor.from_config(config)

    def captions(self, config: TrainingConfig) -> list[CaptionedImage]:
        return self.caption_editor(config).images()

    def tag_frequency(self, config: TrainingConfig) -> list[list]:
        frequency = self.caption_editor(config).tag_frequency()
        return [
            [tag, count] for tag, count in sorted(frequency.items(), key=lambda item: (-item[1], item[0]))
        ]

    def set_caption(self, config: TrainingConfig, image: str, caption: str) -> str:
        if not image:
            raise ActionError("Select an image in the gallery first.")
        return self.caption_editor(config).set_caption(image, caption).message

    def bulk_edit(self, config: TrainingConfig, operation: str, tag: str, replacement: str = "") -> str:
        editor = self.caption_editor(config)
        if operation == "add":
            return editor.add_tag(tag).message
        if operation == "add_first":
            return editor.add_tag(tag, at_start=True).message
        if operation == "remove":
            return editor.remove_tag(tag).message
        if operation == "replace":
            return editor.replace_tag(tag, replacement).message
        if operation == "undo":
            return editor.undo_last_bulk_edit().message
        raise ActionError(f"unknown caption operation {operation!r}")

    def run_tagger(
        self,
        config: TrainingConfig,
        choice: TaggerChoice,
        progress: Callable[[int, int, str], None] | None = None,
    ) -> str:
        """Tag the dataset's images with WD14 under the GPU lock; returns the summary for the user."""
        if self.jobs.is_running():
            raise ActionError("Training is running; tag the images after it has finished.")
        config = self.checked_dataset(config)
        options = TaggingOptions(
            general_threshold=choice.general_threshold,
            character_threshold=choice.character_threshold,
            include_rating=choice.include_rating,
            replace_underscores=choice.replace_underscores,
            undesired_tags=choice.undesired_tags,
            trigger_word=config.trigger_word,
            existing_captions=choice.existing_captions,
            caption_extension=config.caption_extension,
        )
        defaults = self.services.defaults()
        try:
            options.validated()
            if choice.model in WD14_MODELS:
                tagger = WD14Tagger.from_registry(
                    choice.model, defaults.tagger_models_dir, allow_download=defaults.allow_tagger_download
                )
            else:  # placed by hand in a folder of its own name
                tagger = WD14Tagger(ensure_model_files(choice.model, defaults.tagger_models_dir))
        except (TaggerModelUnavailable, TaggerModelError, ValueError) as error:
            raise ActionError(str(error)) from error
        task_id = self.services.new_task_id("tag")
        try:
            with self.services.exclusive_job(task_id, "WD14 tagging") as frame:

                def report(done: int, total: int, name: str) -> None:
                    frame.progress(done, total, f"Tagging {done}/{total} {name}")
                    if progress is not None:
                        progress(done, total, name)

                summary = tag_folder(
                    tagger,
                    config.train_data_dir,
                    options,
                    recursive=config.dataset_layout == "kohya",
                    progress=report,
                    should_cancel=frame.interrupted,
                )
        except (TaggerModelError, OSError) as error:
            raise ActionError(f"Tagging failed: {error}") from error
        finally:
            tagger.unload()
        return summary.text()

    # --- training -----------------------------------------------------------------------------------
    def start_training(self, config: TrainingConfig, task_id: str = "", number_if_taken: bool = False) -> str:
        try:
            job = self.jobs.start(config, task_id=task_id, number_if_taken=number_if_taken)
        except JobRefused as error:
            hint = (
                f" Tick 'number the run' or choose a name like '{error.suggestion}'."
                if error.suggestion
                else ""
            )
            raise ActionError(f"{error}{hint}") from error
        return f"Training {job.run.name} started; epochs go to {job.run.folder}."

    # --- settings files -----------------------------------------------------------------------------
    def import_kohya(self, path: str, base: TrainingConfig) -> tuple[TrainingConfig, str]:
        result = load_kohya_config(path, base)  # a kohya_ss GUI .json or an sd-scripts .toml
        config = dataclasses.replace(result.config, output_dir=base.output_dir)
        return config, result.summary()

    def load_config_file(self, path: str, base: TrainingConfig) -> TrainingConfig:
        """Settings from a JSON file of config fields, over ``base``: keys the file lacks keep their
        current values (a partial file changes only what it names)."""
        try:
            data = json.loads(read_text_file(path))
        except OSError as error:
            raise ActionError(f"{Path(path).name} cannot be read ({error.strerror or error}).") from error
        except ValueError as error:
            raise ActionError(f"{Path(path).name} is not a readable settings file ({error}).") from error
        if not isinstance(data, dict):
            raise ActionError(f"{Path(path).name} must hold a JSON object of settings")
        data.pop("output_dir", None)  # always the Lora folder of this WebUI
        return TrainingConfig.from_dict({**base.to_dict(), **data})

    def load_run_config(self, run_name: str, base: TrainingConfig) -> TrainingConfig:
        run = self.run_outputs(run_name)
        if not run.config_path.is_file():
            raise ActionError(f"The run {run_name} has no saved settings ({run.config_path.name}).")
        return self.load_config_file(str(run.config_path), base)

    # --- results ------------------------------------------------------------------------------------
    def run_outputs(self, run_name: str) -> RunOutputs:
        problem = output_name_problem(run_name or "")
        if problem:
            raise ActionError(f"Choose a run first ({problem}).")
        return RunOutputs(name=run_name, folder=self.output_folder())

    def list_runs(self) -> list[str]:
        """Runs with saved settings in the output folder, newest first."""
        folder = self.output_folder()
        if not folder.is_dir():
            return []
        configs = sorted(folder.glob(f"*{RUN_CONFIG_SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [path.name[: -len(RUN_CONFIG_SUFFIX)] for path in configs]

    def epochs(self, run_name: str) -> list[EpochEntry]:
        run = self.run_outputs(run_name)
        entries = []
        for epoch in run.saved_epochs():
            preview = run.preview_path(epoch)
            entries.append(
                EpochEntry(
                    epoch=epoch,
                    stem=run.stem(epoch),
                    model_path=run.model_path(epoch),
                    preview_path=preview if preview.is_file() else None,
                    notes=_card_notes(run.metadata_path(epoch)),
                )
            )
        return entries

    def run_trigger_word(self, run_name: str) -> str:
        run = self.run_outputs(run_name)
        try:
            return str(json.loads(run.config_path.read_text(encoding="utf-8")).get("trigger_word", ""))
        except (OSError, ValueError):
            return ""

    def comparison(
        self,
        run_name: str,
        *,
        extra_prompt: str = "",
        negative_prompt: str = "",
        seed_count: int = 4,
        weight_axis: bool = False,
    ) -> EpochComparison:
        stems = [entry.stem for entry in self.epochs(run_name)]
        # the recommended epoch (scored runs) comes first: txt2img's prompt starts from it
        recommended = (load_scores(self.run_outputs(run_name)) or {}).get("recommended") or {}
        if recommended.get("stem") in stems:
            stems.insert(0, stems.pop(stems.index(recommended["stem"])))
        try:
            return build_comparison(
                stems,
                self.run_trigger_word(run_name),
                extra_prompt=extra_prompt,
                negative_prompt=negative_prompt,
                seed_count=int(seed_count),
                rng_seed=zlib.crc32(run_name.encode("utf-8")),  # the same seeds in txt2img and in the grid
                weight=float(recommended.get("weight") or 1.0),
                weights=DEFAULT_WEIGHTS if weight_axis else None,
            )
        except ComparisonError as error:
            raise ActionError(str(error)) from error

    def comparison_infotext(self, comparison: EpochComparison, settings: GridSettings) -> str:
        return to_infotext(
            comparison,
            steps=settings.steps,
            sampler=settings.sampler,
            cfg_scale=settings.cfg_scale,
            width=settings.width,
            height=settings.height,
        )

    def render_grid(self, comparison: EpochComparison, settings: GridSettings) -> GridResult:
        if self.jobs.is_running():
            raise ActionError("Training is running; render the grid after it has finished.")
        task_id = self.services.new_task_id("grid")
        with self.services.exclusive_job(task_id, "X/Y/Z comparison grid") as frame:
            return self.services.render_grid(comparison, settings, frame)


def _card_notes(path: Path) -> str:
    try:
        return str(json.loads(path.read_text(encoding="utf-8")).get("notes", ""))
    except (OSError, ValueError):
        return ""
