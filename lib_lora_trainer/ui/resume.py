"""Resume in the Results section: runs that did not finish (stopped, failed, or the WebUI died), and
the button that goes on with one from its newest training state.

The logic is :class:`ResumeActions` (tested without gradio); :class:`ResumeControls` is the small
block of components the tab places in its Results section and wires to its own run watcher.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib_lora_trainer.outputs.registry import EpochRegistry, ResumableRun
from lib_lora_trainer.ui.jobs import JobRefused, TrainingJobs
from lib_lora_trainer.ui.services import HostServices

logger = logging.getLogger(__name__)


class ResumeActions:
    def __init__(self, services: HostServices, jobs: TrainingJobs):
        self.services, self.jobs = services, jobs

    def _registry(self) -> EpochRegistry:
        return EpochRegistry(self.services.lora_roots(), self.services.defaults().lora_subfolder)

    def resumable(self) -> list[ResumableRun]:
        """Runs with a training state that did not finish, the one training now aside."""
        try:
            runs = self._registry().resumable_runs()
        except (OSError, ValueError) as error:
            logger.warning("listing resumable runs: %s", error)
            return []
        if not runs:
            return []
        job = self.jobs.current()
        running = job.run.name if job is not None and job.snapshot().running else None
        return [run for run in runs if run.name != running]

    def choices(self) -> list[str]:
        return [run.name for run in self.resumable()]

    def notice(self) -> str:
        """What the Results section says about unfinished runs ("" when there are none)."""
        runs = self.resumable()
        if not runs:
            return ""
        lines = "; ".join(run.describe() for run in runs)
        return f"Not finished: {lines}. Choose one and press Resume to go on at its last saved step."

    def clean_up_after_crash(self) -> list[Path]:
        """Remove temporary files a killed save left in the Lora folder (called when the tab starts)."""
        if self.jobs.is_running():
            return []
        try:
            return self._registry().remove_stale_temporaries()
        except (OSError, ValueError) as error:
            logger.warning("cleaning temporary files: %s", error)
            return []

    def resume(self, run_name: str, allow_mismatch: bool = False) -> tuple[str, str]:
        """Start the run again from its state: ``(message, task id)``; JobRefused says why not."""
        if not run_name:
            raise JobRefused("Choose a run that did not finish first.")
        job = self.jobs.resume(run_name, allow_mismatch=allow_mismatch)
        return f"Resuming {run_name}; follow it in the Run section.", job.task_id


class ResumeControls:
    """The Resume row of the Results section."""

    def __init__(self, actions: ResumeActions):
        import gradio as gr

        self.actions = actions
        actions.clean_up_after_crash()
        with gr.Row():
            self.choice = gr.Dropdown(
                choices=actions.choices(), label="Runs that did not finish", elem_id="lct_resume_choice"
            )
            self.allow_mismatch = gr.Checkbox(
                label="Go on even if the dataset, checkpoint or settings changed",
                value=False,
                elem_id="lct_resume_allow_mismatch",
            )
            self.refresh_button = gr.Button("Refresh", elem_id="lct_resume_refresh")
            self.resume_button = gr.Button("Resume", variant="primary", elem_id="lct_resume")
        self.message = gr.HTML(_paragraph(actions.notice()), elem_id="lct_resume_message")

    def wire(self, task_id: Any, watch: Callable, watch_outputs: list) -> None:
        self.refresh_button.click(self.on_refresh, [self.choice], [self.choice, self.message])
        self.resume_button.click(
            self.on_resume, [self.choice, self.allow_mismatch], [self.message, task_id]
        ).then(watch, None, watch_outputs)

    def on_refresh(self, current: str | None):
        import gradio as gr

        choices = self.actions.choices()
        value = current if current in choices else (choices[0] if choices else None)
        return gr.update(choices=choices, value=value), _paragraph(self.actions.notice())

    def on_resume(self, run_name: str | None, allow_mismatch: bool):
        try:
            message, task_id = self.actions.resume(run_name or "", bool(allow_mismatch))
        except JobRefused as error:
            return _paragraph(str(error), error=True), ""
        return _paragraph(message), task_id


def _paragraph(text: str, error: bool = False) -> str:
    if not text:
        return ""
    css = "lct-error" if error else "lct-message"
    return f'<p class="{css}">{html.escape(text)}</p>'
