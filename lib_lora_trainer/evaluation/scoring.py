"""Scoring a run: render the evaluation prompts for the base model and every saved epoch through the
host's renderer, score each image set, choose the epoch and the weight, and write the results.

The renderer applies ``<lora:STEM:w>`` tags itself (A1111's txt2img does, with the model given back
after training), so each epoch is rendered from its file exactly as a user will use it. The scoring
models are loaded by :func:`load_scorers` after training and freed by :meth:`Scorers.close`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.dataset.crop import FaceFinder
from lib_lora_trainer.evaluation import metrics
from lib_lora_trainer.evaluation.clip_scorer import ClipScorer, fidelity_text
from lib_lora_trainer.evaluation.embedders import (
    CharacterEmbedder,
    FaceEmbedder,
    ImageEmbedder,
    OnnxModel,
    ScorerModelError,
)
from lib_lora_trainer.evaluation.models import (
    CHARACTER_MODEL,
    CLIP_MODEL,
    FACE_MODEL,
    ScorerModelUnavailable,
    ensure_model,
)
from lib_lora_trainer.evaluation.prompts import (
    EvaluationPrompt,
    evaluation_prompts,
    evaluation_requests,
    seeds,
)
from lib_lora_trainer.evaluation.verdict import EpochScores, Verdict, choose_epoch, choose_weight
from lib_lora_trainer.files import atomic_write_text
from lib_lora_trainer.outputs.registry import EpochCard, RunOutputs
from lib_lora_trainer.outputs.samples import RenderedSample, SampleRequest

logger = logging.getLogger(__name__)

SCORES_SUFFIX = ".lora_trainer_scores.json"
SWEEP_WEIGHTS = (0.5, 0.75, 1.0)
FACE_MAJORITY = 0.5  # auto: the face model when faces are found in more than this share of training images
MAX_TRAINING_IMAGES = 64

Progress = Callable[[int, int, str], None]


class LoraRenderer(Protocol):
    """Renders requests with the ``<lora:...>`` tags in their prompts applied (and saves the images)."""

    def render(
        self, requests: Sequence[SampleRequest], folder: Path, file_stem: str
    ) -> list[RenderedSample]: ...


class ScoringStopped(RuntimeError):
    """The user stopped the scoring; nothing was written to the cards."""


class ScoringUnavailable(RuntimeError):
    """No scoring model can be used; the message says why and what to do."""


@dataclass
class Scorers:
    """The loaded scoring models (either may be missing: the scores it gives are then n/a)."""

    likeness: ImageEmbedder | None
    clip: ClipScorer | None
    kind: str  # "face" or "character"
    reason: str  # why this likeness scorer
    problems: list[str] = field(default_factory=list)

    def close(self) -> None:
        for model in (self.likeness, self.clip):
            close = getattr(model, "close", None)
            if close is not None:
                close()
        self.likeness = self.clip = None


def choose_scorer_kind(
    setting: str, training_images: Sequence[Image.Image], face_finder: FaceFinder | None
) -> tuple[str, str]:
    """("face" | "character", why): ``setting`` unless "auto", else by the faces in the training images."""
    if setting in ("face", "character"):
        return setting, f"the {setting} scorer was chosen in the settings"
    if face_finder is None or not training_images:
        return "character", "no face finder is available, so the character scorer is used"
    with_face = sum(bool(_safe_faces(face_finder, image)) for image in training_images)
    share = with_face / len(training_images)
    if share > FACE_MAJORITY:
        return "face", f"faces were found in {with_face} of {len(training_images)} training images"
    return "character", f"faces were found in only {with_face} of {len(training_images)} training images"


def _safe_faces(face_finder: FaceFinder, image: Image.Image) -> list:
    try:
        return face_finder.find_faces(image.convert("RGB"))
    except Exception as error:  # a detector failure counts as no face
        logger.warning("face detection failed (%s)", error)
        return []


def load_scorers(
    config: TrainingConfig,
    training_images: Sequence[Image.Image],
    *,
    models_dir: str | Path,
    allow_download: bool,
    face_finder: FaceFinder | None = None,
    device: str = "cpu",
) -> Scorers:
    """The likeness model chosen for this dataset and CLIP; raises :class:`ScoringUnavailable` when
    neither can be used."""
    kind, reason = choose_scorer_kind(config.evaluation_scorer, training_images, face_finder)
    problems: list[str] = []
    likeness: ImageEmbedder | None = None
    model = FACE_MODEL if kind == "face" else CHARACTER_MODEL
    try:
        ensure_model(model, models_dir, allow_download=allow_download)
        onnx_model = OnnxModel(model.model_path(models_dir))
        onnx_model.session()  # a corrupt file is reported now, not in the middle of the scoring
        likeness = FaceEmbedder(onnx_model, face_finder) if kind == "face" else CharacterEmbedder(onnx_model)
    except (ScorerModelUnavailable, ScorerModelError) as error:
        problems.append(str(error))
    clip = None
    try:
        clip = ClipScorer.from_folder(
            ensure_model(CLIP_MODEL, models_dir, allow_download=allow_download), device=device
        )
    except (ScorerModelUnavailable, ScorerModelError) as error:
        problems.append(str(error))
    if likeness is None and clip is None:
        raise ScoringUnavailable(" ".join(problems))
    return Scorers(likeness, clip, kind, reason, problems)


# --- scoring one set of images ----------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingReference:
    """The training images as the scorers see them, computed once per run."""

    likeness: np.ndarray | None
    clip: np.ndarray | None
    subject_found: int
    count: int


def reference(scorers: Scorers, training_images: Sequence[Image.Image]) -> TrainingReference:
    likeness = scorers.likeness.embed(training_images) if scorers.likeness is not None else None
    clip = scorers.clip.embed(training_images) if scorers.clip is not None else None
    found = int(np.count_nonzero(np.linalg.norm(likeness, axis=1) > 0)) if likeness is not None else 0
    return TrainingReference(likeness, clip, found, len(training_images))


@dataclass(frozen=True)
class SetScores:
    likeness: float | None
    subject_found_share: float
    fidelity: float | None
    variety: float | None
    memorised: list[metrics.Memorised]


def score_images(
    images: Sequence[Image.Image],
    texts: Sequence[str],
    groups: Sequence[Sequence[int]],
    scorers: Scorers,
    training: TrainingReference,
) -> SetScores:
    """``texts[i]`` is image i's prompt as CLIP reads it; ``groups`` are the indices of one prompt's seeds."""
    like, found_share = None, 0.0
    if scorers.likeness is not None and training.likeness is not None:
        result = metrics.likeness(scorers.likeness.embed(images), training.likeness)
        like, found_share = result.mean, result.found_share
    fidelity = variety = None
    memorised: list[metrics.Memorised] = []
    if scorers.clip is not None:
        image_rows = scorers.clip.embed(images)
        fidelity = metrics.prompt_fidelity(image_rows, scorers.clip.embed_texts(texts))
        variety = metrics.variety([image_rows[list(group)] for group in groups])
        if training.clip is not None:
            memorised = metrics.memorised(image_rows, training.clip)
    return SetScores(like, found_share, fidelity, variety, memorised)


# --- the run ----------------------------------------------------------------------------------------
@dataclass
class RunScores:
    run_name: str
    scorer: str
    scorer_reason: str
    prompts: list[EvaluationPrompt]
    seeds: list[int]
    baseline: EpochScores
    epochs: list[EpochScores]
    verdict: Verdict
    sweep: dict[float, float | None] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def stem(self, epoch: int) -> str:
        return RunOutputs(self.run_name, Path(".")).stem(epoch)

    def to_dict(self) -> dict[str, Any]:
        baseline_fidelity = self.baseline.fidelity
        epochs = []
        for row in self.epochs:
            entry = {"stem": self.stem(row.epoch), **_clean(asdict(row))}
            change = None
            if row.fidelity is not None and baseline_fidelity is not None:
                change = row.fidelity - baseline_fidelity
            entry["fidelity_change"] = change
            epochs.append(entry)
        verdict = self.verdict
        return {
            "run": self.run_name,
            "scorer": self.scorer,
            "scorer_reason": self.scorer_reason,
            "models": _model_sources(),
            "prompts": [asdict(prompt) for prompt in self.prompts],
            "seeds": self.seeds,
            "baseline": _clean(asdict(self.baseline)),
            "epochs": epochs,
            "recommended": {
                "epoch": verdict.epoch,
                "stem": self.stem(verdict.epoch) if verdict.epoch is not None else None,
                "weight": verdict.weight,
                "rule": verdict.rule,
                "weight_rule": verdict.weight_rule,
            },
            "sweep": {f"{weight:g}": value for weight, value in self.sweep.items()},
            "warnings": self.warnings,
            "notes": self.notes,
        }


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    return {key: (None if isinstance(v, float) and not math.isfinite(v) else v) for key, v in values.items()}


def _model_sources() -> dict[str, dict[str, str]]:
    return {
        model.key: {"source": model.page_url, "licence": model.licence}
        for model in (FACE_MODEL, CHARACTER_MODEL, CLIP_MODEL)
    }


class RunScorer:
    """Scores one run's saved epochs; ``progress`` and ``should_stop`` come from the job frame."""

    def __init__(
        self,
        run: RunOutputs,
        config: TrainingConfig,
        scorers: Scorers,
        renderer: LoraRenderer,
        images_folder: Path,
        *,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.run, self.config, self.scorers, self.renderer = run, config, scorers, renderer
        self.images_folder = images_folder
        self.progress = progress or (lambda done, total, text: None)
        self.should_stop = should_stop or (lambda: False)
        self.prompts = evaluation_prompts(config)
        self.seeds = seeds(config)
        self.texts = [
            fidelity_text(prompt.text, config.trigger_word, config.class_token)
            for prompt in self.prompts
            for _ in self.seeds
        ]
        count = len(self.seeds)
        self.groups = [list(range(i * count, (i + 1) * count)) for i in range(len(self.prompts))]
        self.done = self.total = 0

    def score(
        self,
        training_images: Sequence[Image.Image],
        epochs: Sequence[int],
        validation_losses: dict[int, float] | None = None,
    ) -> RunScores:
        if not epochs:
            raise ValueError(f"the run {self.run.name} has no saved epochs to score")
        validation_losses = validation_losses or {}
        per_set = len(self.prompts) * len(self.seeds)
        self.total = per_set * (1 + len(epochs) + len(SWEEP_WEIGHTS) - 1)
        training = reference(self.scorers, training_images)
        notes = list(self.scorers.problems)
        if self.scorers.likeness is not None and training.subject_found == 0:
            notes.append(
                f"No {'face' if self.scorers.kind == 'face' else 'character'} was found in any training "
                "image, so likeness cannot be measured; choose the character scorer for drawn characters."
            )
        baseline_set = self._score_set(None, 1.0, training, "base model")
        baseline = _row(0, baseline_set, None)
        rows, warnings = [], []
        for epoch in epochs:
            scored = self._score_set(self.run.stem(epoch), 1.0, training, f"epoch {epoch}")
            rows.append(_row(epoch, scored, validation_losses.get(epoch)))
            warnings += self._memorisation_warnings(epoch, scored, training_images)
        verdict = choose_epoch(rows, baseline.fidelity)
        sweep: dict[float, float | None] = {}
        if verdict.epoch is not None:
            chosen = next(row for row in rows if row.epoch == verdict.epoch)
            for weight in SWEEP_WEIGHTS:
                if weight == 1.0:
                    sweep[weight] = chosen.likeness
                else:
                    stem = self.run.stem(verdict.epoch)
                    sweep[weight] = self._score_set(
                        stem, weight, training, f"epoch {verdict.epoch} at {weight:g}"
                    ).likeness
            weight, weight_rule = choose_weight(sweep)
            verdict = Verdict(verdict.epoch, verdict.rule, weight, weight_rule)
        return RunScores(
            self.run.name,
            self.scorers.kind,
            self.scorers.reason,
            self.prompts,
            self.seeds,
            baseline,
            rows,
            verdict,
            sweep,
            warnings,
            notes,
        )

    def _score_set(
        self, stem: str | None, weight: float, training: TrainingReference, label: str
    ) -> SetScores:
        requests = evaluation_requests(self.config, self.prompts, stem, weight)
        images: list[Image.Image] = []
        name = f"{stem or self.run.name + '-base'}-eval" + ("" if weight == 1.0 else f"-w{weight:g}")
        for index, request in enumerate(requests):
            if self.should_stop():
                raise ScoringStopped("Scoring was stopped; the epochs and their cards are unchanged.")
            rendered = self.renderer.render([request], self.images_folder, f"{name}-{index:02d}")
            images.append(rendered[0].image)
            self.done += 1
            self.progress(
                self.done, self.total, f"Scoring {self.run.name}: {label}, image {index + 1}/{len(requests)}"
            )
        return score_images(images, self.texts, self.groups, self.scorers, training)

    def _memorisation_warnings(
        self, epoch: int, scored: SetScores, training_images: Sequence[Image.Image]
    ) -> list[str]:
        """One line per epoch: how many images are near copies, and the closest pair."""
        if not scored.memorised:
            return []
        per_seed = len(self.seeds)
        closest = max(scored.memorised, key=lambda item: item.similarity)
        prompt = self.prompts[closest.evaluation_index // per_seed].text
        seed = self.seeds[closest.evaluation_index % per_seed]
        name = (
            getattr(training_images[closest.training_index], "filename", "")
            or f"#{closest.training_index + 1}"
        )
        evaluated = len(self.prompts) * per_seed
        return [
            f"Epoch {epoch}: {len(scored.memorised)} of {evaluated} evaluation images are nearly identical "
            f"to a training image (closest: '{prompt}', seed {seed}, and {Path(name).name}, similarity "
            f"{closest.similarity:.3f}): the LoRA may be memorising its images."
        ]


def _row(epoch: int, scored: SetScores, validation_loss: float | None) -> EpochScores:
    return EpochScores(
        epoch=epoch,
        likeness=scored.likeness,
        fidelity=scored.fidelity,
        variety=scored.variety,
        validation_loss=validation_loss,
        subject_found_share=scored.subject_found_share,
        memorised=len(scored.memorised),
    )


# --- results on disk --------------------------------------------------------------------------------
def scores_path(run: RunOutputs) -> Path:
    return run.folder / f"{run.name}{SCORES_SUFFIX}"


def load_scores(run: RunOutputs) -> dict[str, Any] | None:
    try:
        data = json.loads(scores_path(run).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def previous_validation_losses(run: RunOutputs) -> dict[int, float]:
    """The validation losses kept in an earlier scores file of the run (they come from training)."""
    data = load_scores(run) or {}
    return {
        int(row["epoch"]): float(row["validation_loss"])
        for row in data.get("epochs", [])
        if isinstance(row, dict) and row.get("validation_loss") is not None
    }


def write_results(run: RunOutputs, scores: RunScores) -> list[str]:
    """All scores into the run's JSON; the recommendation into the chosen epoch's card, and out of the
    card an earlier scoring recommended. Returns the stems whose cards changed (to show them again)."""
    atomic_write_text(scores_path(run), json.dumps(scores.to_dict(), indent=2, ensure_ascii=False) + "\n")
    chosen = scores.verdict.epoch
    changed = [
        run.stem(epoch)
        for epoch in run.saved_epochs()
        if epoch != chosen and clear_recommendation(run, epoch)
    ]
    if chosen is not None and write_recommendation(run, scores.verdict) is not None:
        changed.append(run.stem(chosen))
    return changed


RECOMMENDATION_NOTE = " | Recommended epoch of the run"
_RECOMMENDED_WEIGHT = re.compile(re.escape(RECOMMENDATION_NOTE) + r" at weight ([0-9.]+):")
DEFAULT_CARD_WEIGHT = EpochCard.preferred_weight


def split_recommendation(notes: str) -> tuple[str, str | None]:
    """A card's notes without the recommendation a scoring added, and the weight it recommended (as
    written; None when the notes carry no recommendation)."""
    before, mark, _ = notes.partition(RECOMMENDATION_NOTE)
    if not mark:
        return notes, None
    match = _RECOMMENDED_WEIGHT.search(notes)
    return before.strip(), match.group(1) if match else ""


def _read_card(path: Path) -> dict[str, Any] | None:
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("the card %s cannot be updated (%s)", path.name, error)
        return None
    return card if isinstance(card, dict) else None


def write_recommendation(run: RunOutputs, verdict: Verdict) -> Path | None:
    """Set the card's preferred weight and add the recommendation to its notes (other keys kept)."""
    assert verdict.epoch is not None
    card_path = run.metadata_path(verdict.epoch)
    card = _read_card(card_path)
    if card is None:
        return None
    notes, _ = split_recommendation(str(card.get("notes", "")))
    card["preferred weight"] = verdict.weight
    card["notes"] = f"{notes}{RECOMMENDATION_NOTE} at weight {verdict.weight:g}: {verdict.rule}".strip()
    return atomic_write_text(card_path, json.dumps(card, indent=4, ensure_ascii=False))


def clear_recommendation(run: RunOutputs, epoch: int) -> bool:
    """Take an earlier recommendation out of an epoch's card: its note, and the weight it set unless the
    user has changed that weight since. False when the card carries none (it is not rewritten)."""
    card_path = run.metadata_path(epoch)
    if not card_path.is_file():
        return False
    card = _read_card(card_path)
    if card is None:
        return False
    notes, weight = split_recommendation(str(card.get("notes", "")))
    if weight is None:
        return False
    if weight and _same_weight(card.get("preferred weight"), weight):
        card["preferred weight"] = DEFAULT_CARD_WEIGHT
    card["notes"] = notes
    atomic_write_text(card_path, json.dumps(card, indent=4, ensure_ascii=False))
    return True


def _same_weight(value: Any, text: str) -> bool:
    try:
        return math.isclose(float(value), float(text), abs_tol=1e-6)
    except (TypeError, ValueError):
        return False


def load_training_images(config: TrainingConfig, limit: int = MAX_TRAINING_IMAGES) -> list[Image.Image]:
    """The run's images of the character (at most ``limit``, at most 512 px a side), each with its
    ``filename``: the images its held-out share kept out of training first (the same character, never
    seen in training: the fairest reference for likeness), then the training images."""
    from lib_lora_trainer.dataset.images import ImageLoadError, load_image
    from lib_lora_trainer.dataset.scan import scan_dataset

    dataset = scan_dataset(config)
    images: list[Image.Image] = []
    for subset in dataset.held_out + dataset.train_subsets:
        for record in subset.images:
            if len(images) >= limit:
                return images
            try:
                image = load_image(record.path).image.convert("RGB")
            except ImageLoadError as error:
                logger.warning("not scored against %s: %s", record.path.name, error)
                continue
            image.thumbnail((512, 512))
            image.filename = str(record.path)
            images.append(image)
    return images
