"""The Results section's epoch scores: the scoring job (in the host's GPU queue, with progress and
Stop), the automatic run after training, and the score table with the verdict.

The job renders through the host's :meth:`~lib_lora_trainer.ui.services.HostServices.lora_renderer`
and runs :class:`~lib_lora_trainer.evaluation.scoring.RunScorer`; the scoring models are loaded when it
starts and freed when it ends. Stopping leaves the epochs and their cards as they were.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lib_lora_trainer.config import ConfigError, TrainingConfig, output_name_problem
from lib_lora_trainer.dataset.source import DatasetError
from lib_lora_trainer.evaluation.scoring import (
    RunScorer,
    Scorers,
    ScoringStopped,
    ScoringUnavailable,
    load_scorers,
    load_scores,
    load_training_images,
    previous_validation_losses,
    write_results,
)
from lib_lora_trainer.outputs.registry import RunOutputs
from lib_lora_trainer.ui.jobs import TrainingJob, TrainingJobs
from lib_lora_trainer.ui.services import HostServices, JobFrame

logger = logging.getLogger(__name__)

ScorerLoader = Callable[[TrainingConfig, Sequence[Image.Image]], Scorers]
RUNNING = ("queued", "scoring")
POLL_SECONDS = 1.0
# the Lora cards a scoring rewrote are fetched again (javascript/lora_char_trainer.js), even when shown
UPDATE_CARDS_JS = (
    "(cards) => { if (typeof lctUpdateLoraCards === 'function') { lctUpdateLoraCards(cards); } "
    "return cards; }"
)


@dataclass(frozen=True)
class ScoringSnapshot:
    run_name: str
    state: str  # queued, scoring, completed, stopped, unavailable, failed
    message: str
    done: int = 0
    total: int = 0
    changed_cards: tuple[str, ...] = ()  # epoch stems whose Lora card the finished job rewrote

    @property
    def running(self) -> bool:
        return self.state in RUNNING


class ScoringJob:
    """Scores one run's saved epochs in a background thread, under the host's GPU lock."""

    def __init__(
        self,
        services: HostServices,
        run: RunOutputs,
        config: TrainingConfig,
        loader: ScorerLoader,
        validation_losses: dict[int, float] | None = None,
    ):
        self.services, self.run, self.config, self.loader = services, run, config, loader
        self.validation_losses = validation_losses or previous_validation_losses(run)
        self.task_id = services.new_task_id("score")
        self._lock = threading.Lock()
        self._snapshot = ScoringSnapshot(run.name, "queued", "Waiting for the GPU...")
        self._stop = threading.Event()
        self._frame: JobFrame | None = None
        self._thread = threading.Thread(target=self._main, name=f"lora-score-{run.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def snapshot(self) -> ScoringSnapshot:
        with self._lock:
            return self._snapshot

    def should_stop(self) -> bool:
        frame = self._frame
        return self._stop.is_set() or (frame is not None and frame.interrupted())

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._snapshot = dataclasses.replace(self._snapshot, **changes)

    def _progress(self, done: int, total: int, text: str) -> None:
        self._update(done=done, total=total, message=text)
        frame = self._frame
        if frame is not None:
            frame.progress(done, total, text)

    def _main(self) -> None:
        try:
            with self.services.exclusive_job(self.task_id, f"Scoring {self.run.name}") as frame:
                self._frame = frame
                self._update(state="scoring", message="Loading the scoring models...")
                self._score()
        except ScoringStopped as stopped:
            self._finish("stopped", str(stopped))
        except ScoringUnavailable as error:
            self._finish("unavailable", f"Epochs were not scored: {error}")
        except (ConfigError, DatasetError, ValueError, OSError) as error:
            self._finish("failed", f"Scoring failed: {error}")
        except Exception as error:  # anything else must still end the job visibly
            if self.should_stop():  # the host's Interrupt ends a render with an error of its own
                self._finish("stopped", "Scoring was stopped; the epochs and their cards are unchanged.")
                return
            logger.exception("scoring %s failed", self.run.name)
            self._finish("failed", f"Scoring failed: {type(error).__name__}: {error}")
        finally:
            self._frame = None

    def _score(self) -> None:
        images = load_training_images(self.config)
        if not images:
            raise ValueError(
                f"no training image of {self.run.name} can be read from {self.config.train_data_dir}"
            )
        renderer = getattr(self.services, "lora_renderer", None)
        if renderer is None:
            raise ScoringUnavailable("this host cannot render epochs from their files.")
        scorers = self.loader(self.config, images)
        try:
            scorer = RunScorer(
                self.run,
                self.config,
                scorers,
                renderer(),
                self.services.samples_root() / self.run.name / "evaluation",
                progress=self._progress,
                should_stop=self.should_stop,
            )
            scores = scorer.score(images, self.run.saved_epochs(), self.validation_losses)
        finally:
            scorers.close()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self._update(changed_cards=tuple(write_results(self.run, scores)))
        verdict = scores.verdict
        logger.info("%s %s", verdict.rule, verdict.weight_rule)  # the table below shows it too
        self._finish("completed", f"Scored {len(scores.epochs)} epochs of {self.run.name}.")

    def _finish(self, state: str, message: str) -> None:
        (logger.info if state == "completed" else logger.warning)("%s", message)
        self._update(state=state, message=message)


class EpochScoring:
    """The process's scoring job, and the automatic scoring after each finished training run."""

    def __init__(self, services: HostServices, loader: ScorerLoader | None = None):
        self.services = services
        self.loader = loader or self._load_scorers
        self._lock = threading.Lock()
        self._current: ScoringJob | None = None

    def _load_scorers(self, config: TrainingConfig, images: Sequence[Image.Image]) -> Scorers:
        defaults = self.services.defaults()
        return load_scorers(
            config,
            images,
            models_dir=defaults.scorer_models_dir,
            allow_download=defaults.allow_scorer_download,
            face_finder=self.services.face_finder(),
            device="cuda" if torch.cuda.is_available() else "cpu",
        )

    def current(self) -> ScoringJob | None:
        return self._current

    def start(
        self,
        run: RunOutputs,
        config: TrainingConfig | None = None,
        validation_losses: dict[int, float] | None = None,
    ) -> ScoringJob:
        """Start scoring ``run`` (its saved settings unless ``config``); ValueError when it cannot."""
        with self._lock:
            if self._current is not None and self._current.snapshot().running:
                raise ValueError("Epochs are already being scored; wait for that to finish or stop it.")
            if not run.saved_epochs():
                raise ValueError(f"The run {run.name} has no saved epochs to score.")
            if config is None:
                if not run.config_path.is_file():
                    raise ValueError(f"The run {run.name} has no saved settings ({run.config_path.name}).")
                config = TrainingConfig.from_json_file(run.config_path)
            job = ScoringJob(self.services, run, config, self.loader, validation_losses)
            self._current = job
            job.start()
            return job

    def stop(self) -> str:
        job = self._current
        if job is None or not job.snapshot().running:
            return "No scoring is running."
        job.request_stop()
        return "Stopping the scoring after the current image; epochs and cards stay as they are."

    def after_training(self, job: TrainingJob) -> None:
        """A hook for :class:`TrainingJob`: score a completed run when its settings ask for it."""
        snapshot = job.snapshot()
        if snapshot.state != "completed" or not job.config.evaluate_epochs:
            return
        losses = {r.epoch: r.validation_loss for r in snapshot.epoch_results if r.validation_loss is not None}
        try:
            self.start(job.run, job.config, losses)
        except (ValueError, ConfigError) as error:
            logger.warning("epochs of %s not scored: %s", job.run.name, error)
        except Exception:  # the training thread runs this hook: it must end normally whatever happens
            logger.exception("epochs of %s not scored", job.run.name)


_SCORING: weakref.WeakKeyDictionary[TrainingJobs, EpochScoring] = weakref.WeakKeyDictionary()


def scoring_for(services: HostServices, jobs: TrainingJobs) -> EpochScoring:
    """The one :class:`EpochScoring` of ``jobs`` (hooked into its runs once, however often a tab is built)."""
    scoring = _SCORING.get(jobs)
    if scoring is None:
        scoring = EpochScoring(services)
        jobs.on_finished.append(scoring.after_training)
        _SCORING[jobs] = scoring
    return scoring


# --- what the Results section shows ---------------------------------------------------------------------
def _number(value: Any, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


SCORE_MEANINGS = (
    "Likeness: how close the character in the evaluation images is to the training images (1 = the same).",
    "Prompt fidelity: how well the images follow their prompts, read against the base model (0 = as well as "
    "without the LoRA; negative = the LoRA overrides the prompt).",
    "Variety: how different one prompt's images are across seeds (0 = all the same picture).",
    "Validation loss: the model's error on fixed images, noise and timesteps (lower = fits them better).",
)


def scores_html(data: dict[str, Any] | None, snapshot: ScoringSnapshot | None = None) -> str:
    """The score table, the verdict and the warnings of a run (and the job's progress while it runs)."""
    parts = ['<div class="lct-scores">']
    if snapshot is not None:
        fraction = snapshot.done / snapshot.total if snapshot.total else 0.0
        parts.append(
            f'<div class="lct-scoring-state" data-state="{html.escape(snapshot.state)}">'
            f"{html.escape(snapshot.message)}"
            + (f'<progress max="1" value="{fraction:.3f}"></progress>' if snapshot.running else "")
            + "</div>"
        )
    if not data:
        parts.append(
            '<div class="lct-no-scores">This run has not been scored yet: press "Score epochs".</div>'
        )
        return "".join(parts) + "</div>"
    recommended = data.get("recommended") or {}
    baseline = data.get("baseline") or {}
    parts.append(
        f'<div class="lct-verdict" data-epoch="{recommended.get("epoch")}" '
        f'data-weight="{recommended.get("weight")}"><b>Recommended: '
        f"{html.escape(str(recommended.get('stem') or '–'))} at weight {recommended.get('weight', 1):g}</b>. "
        f"{html.escape(recommended.get('rule', ''))} {html.escape(recommended.get('weight_rule', ''))}</div>"
    )
    header = "<tr><th>epoch</th><th>likeness</th><th>subject found</th><th>prompt fidelity (vs base)</th>"
    header += "<th>variety</th><th>validation loss</th><th>memorised</th></tr>"
    rows = [
        f'<tr data-epoch="0"><td>base model</td><td>{_number(baseline.get("likeness"))}</td>'
        f"<td>{_number(baseline.get('subject_found_share'), 2)}</td>"
        f"<td>{_number(baseline.get('fidelity'))}</td><td>{_number(baseline.get('variety'))}</td>"
        "<td>–</td><td>–</td></tr>"
    ]
    for row in data.get("epochs", []):
        chosen = ' class="lct-recommended"' if row.get("epoch") == recommended.get("epoch") else ""
        cells = [
            f"<code>{html.escape(str(row.get('stem')))}</code>",
            _number(row.get("likeness")),
            _number(row.get("subject_found_share"), 2),
            _number(row.get("fidelity_change"), signed=True),
            _number(row.get("variety")),
            _number(row.get("validation_loss"), 4),
            str(row.get("memorised", 0)),
        ]
        tds = "".join(f"<td>{cell}</td>" for cell in cells)
        rows.append(f'<tr data-epoch="{row.get("epoch")}"{chosen}>{tds}</tr>')
    parts.append(f'<table class="lct-score-table">{header}{"".join(rows)}</table>')
    parts.append(
        f'<div class="lct-scorer">Likeness scorer: {html.escape(str(data.get("scorer")))} '
        f"({html.escape(str(data.get('scorer_reason', '')))}).</div>"
    )
    items = [("lct-warning", text) for text in data.get("warnings", [])]
    items += [("lct-note", text) for text in data.get("notes", [])]
    if items:
        parts.append("<ul>" + "".join(f'<li class="{k}">{html.escape(t)}</li>' for k, t in items) + "</ul>")
    parts.append("<details><summary>What the scores mean</summary><ul>")
    parts.append("".join(f"<li>{html.escape(text)}</li>" for text in SCORE_MEANINGS) + "</ul></details>")
    return "".join(parts) + "</div>"


class ScoringPanel:
    """The "Score epochs" part of Results: build the components, then wire them to the run dropdown."""

    def __init__(self, services: HostServices, jobs: TrainingJobs, output_folder: Callable[[], Path]):
        self.services = services
        self.scoring = scoring_for(services, jobs)
        self.output_folder = output_folder

    def build(self) -> None:
        import gradio as gr

        with gr.Row():
            self.score_button = gr.Button("Score epochs", elem_id="lct_score_epochs")
            self.stop_button = gr.Button("Stop scoring", elem_id="lct_stop_scoring")
        self.scores = gr.HTML(scores_html(None), elem_id="lct_scores")
        # {"job": ..., "stems": [...]}: the cards a finished scoring rewrote (their weight and notes)
        self.scored_cards = gr.Textbox(visible=False, elem_id="lct_scored_cards")

    def wire(self, run_choice: Any, results_version: Any) -> None:
        outputs = [self.scores, self.scored_cards]
        self.score_button.click(self.on_score, [run_choice], outputs)
        # outside the queue: a Stop must not wait behind the stream of the job it stops
        self.stop_button.click(self.on_stop, [run_choice], outputs, queue=False)
        run_choice.change(self.watch, [run_choice], outputs)
        results_version.change(self.watch, [run_choice], outputs)
        self.scored_cards.change(None, [self.scored_cards], None, _js=UPDATE_CARDS_JS)

    def _run(self, run_name: str) -> RunOutputs:
        problem = output_name_problem(run_name)
        if problem:  # a run name is a file stem in the Lora folder, never a path
            raise ValueError(f"Choose a run first ({problem}).")
        return RunOutputs(run_name, self.output_folder())

    def _scores(self, run_name: str | None) -> dict[str, Any] | None:
        try:
            return load_scores(self._run(run_name)) if run_name else None
        except ValueError:
            return None

    def on_score(self, run_name: str | None) -> Iterator[tuple[str, Any]]:
        if not run_name:
            yield scores_html(None, ScoringSnapshot("", "failed", "Choose a run first.")), _unchanged()
            return
        try:
            self.scoring.start(self._run(run_name))
        except (ValueError, ConfigError, OSError) as error:
            snapshot = ScoringSnapshot(run_name, "failed", str(error))
            yield scores_html(self._scores(run_name), snapshot), _unchanged()
            return
        yield from self.watch(run_name)

    def on_stop(self, run_name: str | None) -> tuple[str, Any]:
        message = self.scoring.stop()
        snapshot = ScoringSnapshot(run_name or "", "stopped", message)
        return scores_html(self._scores(run_name), snapshot), _unchanged()

    def watch(self, run_name: str | None) -> Iterator[tuple[str, Any]]:
        """The run's scores; while its scoring job runs, its progress every second until it ends, then
        the cards it rewrote (once per job: the page fetches those cards again)."""
        while True:
            job = self.scoring.current()
            snapshot = job.snapshot() if job is not None and job.run.name == run_name else None
            cards = _unchanged()
            if job is not None and snapshot is not None and snapshot.changed_cards:
                cards = json.dumps({"job": job.task_id, "stems": list(snapshot.changed_cards)})
            yield scores_html(self._scores(run_name), snapshot), cards
            if snapshot is None or not snapshot.running:
                return
            time.sleep(POLL_SECONDS)


def _unchanged() -> Any:
    import gradio as gr

    return gr.update()
