"""The "Train Character LoRA" tab, in the order of the work: Dataset, Captions, Training, Run, Results.

Plain gradio 3.41 and a :class:`~lib_lora_trainer.ui.services.HostServices`: the same code runs inside
A1111 and in the stand-alone test app. The handlers here only convert between gradio values and
:class:`~lib_lora_trainer.ui.actions.TabActions`; the behaviour lives there.

Every handler that needs the settings gets the whole form at once: its inputs are a *set* of components
(:meth:`_Tab.form_inputs`), so gradio calls it with one ``{component: value}`` dict, which
:class:`FormState` turns into the :class:`TrainingConfig` (its fields come from
:data:`~lib_lora_trainer.ui.form.FIELDS`) and the tab's other values. A section is one
``_..._section`` method for its layout and one ``_wire_...`` method for its events.
"""

from __future__ import annotations

import html
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import gradio as gr

from lib_lora_trainer.captioning import ExistingCaptionMode
from lib_lora_trainer.config import ConfigError, TrainingConfig
from lib_lora_trainer.presets import apply_preset, preset_names
from lib_lora_trainer.ui import views
from lib_lora_trainer.ui.actions import (
    USER_ERRORS,
    ActionError,
    TabActions,
    TaggerChoice,
    default_tagger_model,
    default_tagger_thresholds,
    tagger_models,
)
from lib_lora_trainer.ui.form import (
    ADVANCED,
    BASIC,
    CAPTIONS,
    DATASET,
    FIELD_NAMES,
    SAMPLES,
    FieldSpec,
    config_from_values,
    fields_in,
    value_for_form,
    values_from_config,
)
from lib_lora_trainer.ui.form_memory import FormMemory
from lib_lora_trainer.ui.jobs import JobSnapshot, TrainingJobs
from lib_lora_trainer.ui.resume import ResumeActions, ResumeControls
from lib_lora_trainer.ui.scoring import ScoringPanel
from lib_lora_trainer.ui.services import GridSettings, HostServices
from lib_lora_trainer.ui.uploads import RefusedUpload, UploadFile

logger = logging.getLogger(__name__)

TAB_TITLE = "Train Character LoRA"
TAB_ID = "lora_char_trainer"
POLL_SECONDS = 1.0

ATTACH_JS = (
    "(id) => { if (id && typeof lctAttachProgress === 'function') { lctAttachProgress(id); } return id; }"
)
# new epochs are announced to the Lora extension on the server; their cards are HTML in the page, and
# only those cards are fetched again (A1111's refresh button would rebuild every extra-networks page)
REFRESH_CARDS_JS = (
    "(stems) => { if (typeof lctRefreshLoraCards === 'function') { lctRefreshLoraCards(stems); } "
    "return stems; }"
)


def start_js(task_id_index: int) -> str:
    """The Train button's JavaScript: inside A1111 ``lctStartTraining`` (javascript/) puts a fresh task id
    at ``task_id_index`` of the submitted values and attaches the WebUI's own progress bar to it;
    elsewhere the values pass through unchanged."""
    return (
        f"(...args) => (typeof lctStartTraining === 'function' ? lctStartTraining({task_id_index}, args) "
        ": args)"
    )


class FormState:
    """One submitted form: gradio's ``{component: value}`` for a set of inputs, read by name.

    ``config()`` is the :class:`TrainingConfig` the FIELDS inputs describe; ``self[component]`` is any
    other input of the event (the tagger's model, the selected image ...).
    """

    def __init__(self, values: Mapping[Any, Any], fields: Mapping[str, Any]):
        self.values = values
        self.fields = fields

    def __getitem__(self, component: Any) -> Any:
        return self.values[component]

    def config(self) -> TrainingConfig:
        """Raises :class:`~lib_lora_trainer.config.ConfigError` for a value of the wrong type."""
        return config_from_values([self.values[self.fields[name]] for name in FIELD_NAMES])


def _component(spec: FieldSpec, value: Any) -> gr.components.Component:
    common = {"label": spec.label, "info": spec.info or None, "elem_id": spec.elem_id}
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices), value=value, **common)
    if spec.kind == "int":
        return gr.Number(value=value, precision=0, minimum=spec.minimum, maximum=spec.maximum, **common)
    if spec.kind == "float":
        return gr.Number(value=value, minimum=spec.minimum, maximum=spec.maximum, **common)
    if spec.kind == "textarea":
        return gr.Textbox(value=value, lines=3, **common)
    return gr.Textbox(value=value, lines=1, **common)


def _message(text: str, kind: str = "info") -> str:
    return f'<div class="lct-message lct-{kind}">{html.escape(text)}</div>'


def _error_text(error: BaseException) -> str:
    return "\n".join(error.messages) if isinstance(error, ConfigError) else str(error)


def _error_message(error: BaseException) -> str:
    text = _error_text(error)
    logger.warning("%s", text)
    return _message(text, "error")


class _Tab:
    """Builds the components and wires the events; one instance per rendered page layout.

    Adding a block (a button and what it shows): create its components in the section's layout method
    (or a new ``_..._section`` called from :meth:`build`) and wire them in a ``_wire_...`` method called
    from :meth:`_wire`. A handler that needs the settings is wired with ``self.form_inputs(*extra)``,
    takes one ``values`` dict and reads ``self._config(self._form(values))`` and ``form[component]``.
    """

    def __init__(self, services: HostServices, jobs: TrainingJobs):
        self.services = services
        self.jobs = jobs
        self.actions = TabActions(services, jobs)
        defaults = services.defaults()
        self.initial = TrainingConfig(train_data_dir=defaults.dataset_dir)
        remembered_at = getattr(services, "form_memory_path", None)  # a host may keep no form
        self.memory = FormMemory(remembered_at() if remembered_at else None)
        self.fields: dict[str, gr.components.Component] = {}

    # --- the form -----------------------------------------------------------------------------------
    @property
    def config_outputs(self) -> list[gr.components.Component]:
        """The FIELDS inputs in FIELDS order (what :func:`values_from_config` fills)."""
        return [self.fields[name] for name in FIELD_NAMES]

    def form_inputs(self, *extra: gr.components.Component) -> set[gr.components.Component]:
        """The whole form plus ``extra``: as a set, gradio hands the handler one ``{component: value}``."""
        return {*self.fields.values(), *extra}

    def _form(self, values: Mapping[Any, Any]) -> FormState:
        return FormState(values, self.fields)

    def _config(self, form: FormState) -> TrainingConfig:
        """The form's config, remembered as the last submitted one (a reloaded page gets it back)."""
        config = form.config()
        self.memory.save(config)
        return config

    def _fields(self, section: str) -> None:
        for spec in fields_in(section):
            self.fields[spec.name] = _component(spec, value_for_form(spec, self.initial))

    # --- layout -------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        with gr.Blocks(analytics_enabled=False, css=None) as tab:
            gr.HTML(
                f'<div class="lct-header">Train a character LoRA on the model this WebUI has loaded '
                f"({self.services.title}). Work from left to right: dataset, captions, training, run, "
                "results.</div>"
            )
            with gr.Tabs(elem_id="lct_sections"):
                with gr.Tab("1. Dataset", elem_id="lct_tab_dataset"):
                    self._dataset_section()
                with gr.Tab("2. Captions", elem_id="lct_tab_captions"):
                    self._captions_section()
                with gr.Tab("3. Training", elem_id="lct_tab_training"):
                    self._training_section()
                with gr.Tab("4. Run", elem_id="lct_tab_run"):
                    self._run_section()
                with gr.Tab("5. Results", elem_id="lct_tab_results"):
                    self._results_section()
            self._wire(tab)
        return tab

    def _dataset_section(self) -> None:
        with gr.Row():
            with gr.Column(scale=2):
                self._fields(DATASET)
                self.scan_button = gr.Button("Scan dataset", variant="primary", elem_id="lct_scan")
            with gr.Column(scale=3):
                self.report = gr.Textbox(
                    label="Dataset report", lines=14, interactive=False, elem_id="lct_report"
                )
        self.crops = gr.Gallery(
            label="How training will crop them", columns=6, height=260, elem_id="lct_crops"
        )

    def _captions_section(self) -> None:
        with gr.Row():
            with gr.Column():
                self._fields(CAPTIONS)
                model = default_tagger_model(self.services.defaults().tagger_models_dir)
                general, character = default_tagger_thresholds(model)
                self.tagger_model = gr.Dropdown(
                    choices=tagger_models(self.services.defaults().tagger_models_dir),
                    value=model,
                    info="Downloaded once into the tagger folder of the settings, then used offline.",
                    label="Tagger model",
                    elem_id="lct_tagger_model",
                )
                with gr.Row():
                    self.general_threshold = gr.Slider(
                        0, 1, value=general, step=0.01, label="General tags threshold"
                    )
                    self.character_threshold = gr.Slider(
                        0, 1, value=character, step=0.01, label="Character tags threshold"
                    )
                self.undesired_tags = gr.Textbox(
                    label="Undesired tags (comma separated)", elem_id="lct_undesired"
                )
                self.existing_mode = gr.Radio(
                    choices=[mode.value for mode in ExistingCaptionMode],
                    value=ExistingCaptionMode.SKIP.value,
                    label="Images that already have a caption",
                    info="skip: leave them; append/prepend: add the new tags; overwrite: replace (backed up)",
                    elem_id="lct_existing_mode",
                )
                with gr.Row():
                    self.include_rating = gr.Checkbox(label="Add the rating tag", value=False)
                    self.replace_underscores = gr.Checkbox(label="Underscores to spaces", value=True)
                self.tag_button = gr.Button("Run tagger", variant="primary", elem_id="lct_run_tagger")
                self.tag_summary = gr.Textbox(
                    label="Tagger report", lines=4, interactive=False, elem_id="lct_tag_summary"
                )
            with gr.Column():
                self.tag_frequency = gr.Dataframe(
                    headers=["tag", "images"],
                    datatype=["str", "number"],
                    label="Tag frequency",
                    interactive=False,
                    elem_id="lct_tag_frequency",
                    max_rows=15,
                )
        self.load_captions_button = gr.Button("Load images and captions", elem_id="lct_load_captions")
        self.caption_gallery = gr.Gallery(
            label="Click an image to edit its caption",
            columns=6,
            height=300,
            allow_preview=False,
            elem_id="lct_caption_gallery",
        )
        self.gallery_paths = gr.State([])
        self.selected_image = gr.State("")
        with gr.Row():
            with gr.Column(scale=3):
                self.selected_label = gr.Markdown("No image selected.", elem_id="lct_selected_image")
                self.caption_box = gr.Textbox(label="Caption", lines=3, elem_id="lct_caption")
            with gr.Column(scale=1):
                self.save_caption_button = gr.Button("Save caption", elem_id="lct_save_caption")
        with gr.Row():
            self.bulk_tag = gr.Textbox(label="Tag", elem_id="lct_bulk_tag")
            self.bulk_replacement = gr.Textbox(label="Replace with", elem_id="lct_bulk_replacement")
        with gr.Row():
            self.add_first_button = gr.Button("Add first", elem_id="lct_add_first")
            self.add_button = gr.Button("Add at end", elem_id="lct_add")
            self.remove_button = gr.Button("Remove", elem_id="lct_remove")
            self.replace_button = gr.Button("Replace", elem_id="lct_replace")
            self.undo_button = gr.Button("Undo last bulk edit", elem_id="lct_undo")
        self.caption_message = gr.HTML(elem_id="lct_caption_message")

    def _training_section(self) -> None:
        with gr.Row():
            self.preset = gr.Dropdown(
                choices=preset_names(), value=preset_names()[0], label="Preset", elem_id="lct_preset"
            )
            self.apply_preset_button = gr.Button("Apply preset", elem_id="lct_apply_preset")
        self._fields(BASIC)
        with gr.Accordion("Samples after each epoch", open=False, elem_id="lct_samples_settings"):
            self._fields(SAMPLES)
        with gr.Accordion("Advanced", open=False, elem_id="lct_advanced_settings"):
            self._fields(ADVANCED)
        with gr.Accordion("Import or load settings", open=False, elem_id="lct_import_settings"):
            with gr.Row():
                self.kohya_file = UploadFile(
                    label="kohya_ss GUI config (.json) or sd-scripts config (.toml)",
                    file_types=[".json", ".toml"],
                    elem_id="lct_kohya_file",
                )
                self.config_file = UploadFile(
                    label="Settings saved by this trainer (.json)",
                    file_types=[".json"],
                    elem_id="lct_config_file",
                )
            with gr.Row():
                self.import_kohya_button = gr.Button("Import kohya config", elem_id="lct_import_kohya")
                self.load_config_button = gr.Button("Load settings file", elem_id="lct_load_config")
        self.settings_message = gr.HTML(elem_id="lct_settings_message")

    def _run_section(self) -> None:
        self.number_if_taken = gr.Checkbox(
            label="If the LoRA name is taken, number the run (name_run2) instead of asking",
            value=False,
            elem_id="lct_number_if_taken",
        )
        with gr.Row():
            self.train_button = gr.Button("Train", variant="primary", elem_id="lct_train")
            # the WebUI's own Interrupt button lives in txt2img/img2img and shows only for their
            # generations: this one does the same for the run (ends it after the current step)
            self.stop_button = gr.Button("Stop (interrupt)", variant="stop", elem_id="lct_stop")
        gr.HTML('<div id="lct_progressbar"></div>')
        self.run_message = gr.HTML(elem_id="lct_run_message")
        self.status = gr.HTML(views.status_html(None), elem_id="lct_status")
        self.chart = gr.HTML(views.chart_html(None), elem_id="lct_chart")
        self.samples = gr.Gallery(label="Samples of each epoch", columns=4, height=300, elem_id="lct_samples")
        self.log = gr.Textbox(label="Log", lines=6, interactive=False, elem_id="lct_log")
        self.task_id = gr.Textbox(visible=False, elem_id="lct_task_id")
        self.results_version = gr.Textbox(visible=False, elem_id="lct_results_version")
        self.new_cards = gr.Textbox(visible=False, elem_id="lct_new_cards")  # JSON list of epoch stems

    def _results_section(self) -> None:
        with gr.Row():
            self.run_choice = gr.Dropdown(choices=self._runs(), label="Run", elem_id="lct_run_choice")
            self.refresh_runs_button = gr.Button("Refresh", elem_id="lct_refresh_runs")
            self.load_run_settings_button = gr.Button(
                "Load this run's settings", elem_id="lct_load_run_settings"
            )
        self.epochs_html = gr.HTML(views.epochs_table([]), elem_id="lct_epoch_list")
        self.epochs_gallery = gr.Gallery(
            label="Epoch previews", columns=6, height=220, elem_id="lct_epoch_previews"
        )
        # --- epoch scores (lib_lora_trainer.ui.scoring) ---
        self.scoring_panel = ScoringPanel(self.services, self.jobs, self.actions.output_folder)
        self.scoring_panel.build()
        with gr.Row():
            self.extra_prompt = gr.Textbox(label="More prompt text", elem_id="lct_compare_prompt")
            self.compare_negative = gr.Textbox(label="Negative prompt", elem_id="lct_compare_negative")
        with gr.Row():
            self.seed_count = gr.Slider(
                1, 8, value=4, step=1, label="Seeds (Y axis)", elem_id="lct_seed_count"
            )
            self.weight_axis = gr.Checkbox(
                label="LoRA weight axis (Z: 0.6, 0.8, 1)", value=False, elem_id="lct_weight_axis"
            )
        with gr.Row():
            self.grid_steps = gr.Number(value=20, precision=0, label="Steps", elem_id="lct_grid_steps")
            self.grid_sampler = gr.Textbox(value="Euler a", label="Sampler", elem_id="lct_grid_sampler")
            self.grid_cfg = gr.Number(value=7.0, label="CFG scale", elem_id="lct_grid_cfg")
            self.grid_width = gr.Number(value=512, precision=0, label="Width", elem_id="lct_grid_width")
            self.grid_height = gr.Number(value=512, precision=0, label="Height", elem_id="lct_grid_height")
        self.infotext = gr.Textbox(
            label="Parameters sent to txt2img", lines=3, interactive=False, elem_id="lct_compare_infotext"
        )
        with gr.Row():
            self.compare_button = gr.Button(
                "Compare in txt2img", variant="primary", interactive=False, elem_id="lct_compare"
            )
            self.render_grid_button = gr.Button(
                "Render grid here", interactive=False, elem_id="lct_render_grid"
            )
        self.results_message = gr.HTML(elem_id="lct_results_message")
        # --- resume (logic in ui/resume.py) ---
        self.resume_controls = ResumeControls(ResumeActions(self.services, self.jobs))
        self.grid_image = gr.Image(label="Comparison grid", type="pil", interactive=False, elem_id="lct_grid")

    # --- events -------------------------------------------------------------------------------------
    def _wire(self, tab: gr.Blocks) -> None:
        self._wire_dataset()
        self._wire_captions()
        self._wire_settings(tab)
        self._wire_run(tab)
        self._wire_results()

    def _wire_dataset(self) -> None:
        self.scan_button.click(self.on_scan, self.form_inputs(), [self.report, self.crops])

    def _wire_captions(self) -> None:
        self.tagger_model.change(
            lambda model: default_tagger_thresholds(model),
            [self.tagger_model],
            [self.general_threshold, self.character_threshold],
        )
        tagger_inputs = self.form_inputs(
            self.tagger_model,
            self.general_threshold,
            self.character_threshold,
            self.undesired_tags,
            self.existing_mode,
            self.include_rating,
            self.replace_underscores,
        )
        caption_outputs = [self.caption_gallery, self.gallery_paths, self.tag_frequency]
        self.tag_button.click(self.on_tag, tagger_inputs, [self.tag_summary, *caption_outputs])
        self.load_captions_button.click(
            self.on_load_captions, self.form_inputs(), [*caption_outputs, self.caption_message]
        )
        self.caption_gallery.select(
            self.on_select_image,
            self.form_inputs(self.gallery_paths),
            [self.selected_image, self.selected_label, self.caption_box],
        )
        self.save_caption_button.click(
            self.on_save_caption,
            self.form_inputs(self.selected_image, self.caption_box),
            [*caption_outputs, self.caption_message],
        )
        for button, operation in (
            (self.add_first_button, "add_first"),
            (self.add_button, "add"),
            (self.remove_button, "remove"),
            (self.replace_button, "replace"),
            (self.undo_button, "undo"),
        ):
            button.click(
                self._bulk_handler(operation),
                self.form_inputs(self.bulk_tag, self.bulk_replacement),
                [*caption_outputs, self.caption_message],
            )

    def _wire_settings(self, tab: gr.Blocks) -> None:
        outputs = [*self.config_outputs, self.settings_message]
        self.apply_preset_button.click(self.on_apply_preset, self.form_inputs(self.preset), outputs)
        self.import_kohya_button.click(self.on_import_kohya, self.form_inputs(self.kohya_file), outputs)
        self.load_config_button.click(self.on_load_config, self.form_inputs(self.config_file), outputs)
        self.load_run_settings_button.click(
            self.on_load_run_settings, self.form_inputs(self.run_choice), outputs
        )
        tab.load(self.on_page_load, None, self.config_outputs)

    def _wire_run(self, tab: gr.Blocks) -> None:
        watch_outputs = [
            self.status,
            self.chart,
            self.samples,
            self.log,
            self.task_id,
            self.run_choice,
            self.results_version,
            self.new_cards,
        ]
        train_inputs = self.form_inputs(self.task_id, self.number_if_taken)
        # gradio sends a set of inputs sorted by component id: that is where the JavaScript puts the id
        task_id_index = sorted(train_inputs, key=lambda component: component._id).index(self.task_id)
        self.train_button.click(
            self.on_train, train_inputs, [self.run_message, self.task_id], _js=start_js(task_id_index)
        ).then(self.watch, None, watch_outputs)
        # outside the queue: a Stop must not wait behind the streams of the page (watch, scoring)
        self.stop_button.click(self.on_stop, None, [self.run_message], queue=False)
        self.resume_controls.wire(self.task_id, self.watch, watch_outputs)
        tab.load(self.watch, None, watch_outputs)
        self.task_id.change(None, [self.task_id], None, _js=ATTACH_JS)
        self.new_cards.change(None, [self.new_cards], None, _js=REFRESH_CARDS_JS)

    def _wire_results(self) -> None:
        compare_inputs = [
            self.run_choice,
            self.extra_prompt,
            self.compare_negative,
            self.seed_count,
            self.weight_axis,
            self.grid_steps,
            self.grid_sampler,
            self.grid_cfg,
            self.grid_width,
            self.grid_height,
        ]
        results_outputs = [
            self.epochs_html,
            self.epochs_gallery,
            self.infotext,
            self.compare_button,
            self.render_grid_button,
            self.results_message,
        ]
        grid_fields = [self.grid_steps, self.grid_sampler, self.grid_cfg, self.grid_width, self.grid_height]
        # a run chosen: the grid starts from the size and sampling its samples used
        self.run_choice.change(self.on_run_chosen, [self.run_choice], grid_fields).then(
            self.on_results, compare_inputs, results_outputs
        )
        for trigger in (self.results_version, self.weight_axis, self.seed_count):
            trigger.change(self.on_results, compare_inputs, results_outputs)
        for trigger in (self.extra_prompt, self.compare_negative, *grid_fields):
            trigger.blur(self.on_results, compare_inputs, results_outputs)
        self.refresh_runs_button.click(self.on_refresh_runs, [self.run_choice], [self.run_choice]).then(
            self.on_results, compare_inputs, results_outputs
        )
        self.services.connect_send_to_txt2img(self.compare_button, self.infotext)
        self.render_grid_button.click(
            self.on_render_grid, compare_inputs, [self.grid_image, self.results_message]
        )
        self.scoring_panel.wire(self.run_choice, self.results_version)
        # a finished scoring: "Compare in txt2img" now starts from the recommended epoch
        self.scoring_panel.scored_cards.change(self.on_results, compare_inputs, results_outputs)

    # --- handlers: dataset and captions ---------------------------------------------------------------
    def on_scan(self, values: dict):
        try:
            result = self.actions.scan(self._config(self._form(values)))
        except (ActionError, *USER_ERRORS) as error:
            return _error_text(error), []
        return result.report_text, result.previews

    def _caption_view(self, config: TrainingConfig):
        items = self.actions.captions(config)
        paths = [str(item.image) for item in items]
        gallery = views.caption_gallery([(item.image, item.caption) for item in items])
        return gallery, paths, self.actions.tag_frequency(config)

    def on_tag(self, values: dict, progress=gr.Progress()):  # noqa: B008 (gradio injects the tracker)
        form = self._form(values)
        try:
            config = self._config(form)
            choice = TaggerChoice(
                form[self.tagger_model],
                float(form[self.general_threshold]),
                float(form[self.character_threshold]),
                form[self.undesired_tags] or "",
                form[self.existing_mode],
                bool(form[self.include_rating]),
                bool(form[self.replace_underscores]),
            )
            summary = self.actions.run_tagger(
                config, choice, progress=lambda done, total, name: progress((done, total), desc=name)
            )
            return (summary, *self._caption_view(config))
        except (ActionError, *USER_ERRORS) as error:
            logger.warning("tagging: %s", error)
            return _error_text(error), gr.update(), gr.update(), gr.update()

    def on_load_captions(self, values: dict):
        try:
            return (*self._caption_view(self._config(self._form(values))), "")
        except (ActionError, *USER_ERRORS) as error:
            return [], [], [], _error_message(error)

    def on_select_image(self, values: dict, evt: gr.SelectData):
        form = self._form(values)
        paths = form[self.gallery_paths]
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        if not paths or not 0 <= index < len(paths):
            return "", "No image selected.", ""
        image = paths[index]
        try:
            items = {str(item.image): item for item in self.actions.captions(self._config(form))}
        except (ActionError, *USER_ERRORS) as error:
            return "", _error_text(error), ""
        item = items.get(image)
        if item is None:
            return "", "That image is no longer in the dataset; reload the captions.", ""
        note = f" ({item.problem})" if item.problem else ""
        return image, f"**{item.image.name}**{note}", item.caption

    def on_save_caption(self, values: dict):
        form = self._form(values)
        try:
            config = self._config(form)
            message = self.actions.set_caption(config, form[self.selected_image], form[self.caption_box])
            return (*self._caption_view(config), _message(message))
        except (ActionError, *USER_ERRORS) as error:
            return gr.update(), gr.update(), gr.update(), _error_message(error)

    def _bulk_handler(self, operation: str) -> Callable:
        def handler(values: dict):
            form = self._form(values)
            try:
                config = self._config(form)
                tag, replacement = form[self.bulk_tag] or "", form[self.bulk_replacement] or ""
                message = self.actions.bulk_edit(config, operation, tag, replacement)
                return (*self._caption_view(config), _message(message))
            except (ActionError, *USER_ERRORS) as error:
                return gr.update(), gr.update(), gr.update(), _error_message(error)

        return handler

    # --- handlers: settings -------------------------------------------------------------------------
    def _with_config(self, values: dict, change: Callable[[TrainingConfig, FormState], tuple]):
        """Run ``change(config, form)`` -> (new config, message) and put the new config into the form."""
        try:
            form = self._form(values)
            updated, message = change(form.config(), form)
            self.memory.save(updated)  # what the form shows now is what a reload brings back
            return (*values_from_config(updated), _message(message))
        except (ActionError, *USER_ERRORS) as error:
            return (*[gr.update()] * len(FIELD_NAMES), _error_message(error))

    def on_apply_preset(self, values: dict):
        def change(config, form):
            name = form[self.preset]
            return apply_preset(config, name), f"Preset '{name}' applied."

        return self._with_config(values, change)

    def on_import_kohya(self, values: dict):
        def change(config, form):
            missing = "Choose a kohya_ss .json or sd-scripts .toml file first."
            path = _upload_path(form[self.kohya_file], missing)
            return self.actions.import_kohya(path, config)

        return self._with_config(values, change)

    def on_load_config(self, values: dict):
        def change(config, form):
            path = _upload_path(form[self.config_file], "Choose a settings .json file first.")
            return self.actions.load_config_file(path, config), "Settings loaded."

        return self._with_config(values, change)

    def on_load_run_settings(self, values: dict):
        def change(config, form):
            run_name = form[self.run_choice] or ""
            return self.actions.load_run_config(run_name, config), f"Settings of run '{run_name}' loaded."

        return self._with_config(values, change)

    def on_page_load(self):
        """The last submitted form back in the page (defaults when there is none)."""
        remembered = self.memory.load(self.initial)
        if remembered is None:
            return [gr.update()] * len(FIELD_NAMES)
        return values_from_config(remembered)

    # --- handlers: run ------------------------------------------------------------------------------
    def on_train(self, values: dict):
        form = self._form(values)
        try:
            message = self.actions.start_training(
                self._config(form),
                task_id=form[self.task_id] or "",
                number_if_taken=bool(form[self.number_if_taken]),
            )
        except (ActionError, *USER_ERRORS) as error:
            return _error_message(error), ""
        job = self.jobs.current()
        return _message(message), job.task_id if job else ""

    def on_stop(self):
        return _message(self.jobs.stop())

    def watch(self) -> Iterator[tuple]:
        """Stream the job's state to this page until it ends (also on page load: picks a run up again).

        Each output is sent only when it changed since the last yield; the rest go as ``gr.update()``
        (the sample gallery and the loss chart are the big ones)."""
        sent = _ChangedOnly()
        announced_run, announced_epochs = None, -1
        while True:
            job = self.jobs.current()
            snapshot = job.snapshot() if job else None
            run_update, results_update = gr.update(), gr.update()
            if snapshot is not None:
                epochs = len(snapshot.epoch_results)
                if announced_run != snapshot.run_name or epochs != announced_epochs or not snapshot.running:
                    choices = self._runs()
                    if snapshot.run_name not in choices:
                        choices.insert(0, snapshot.run_name)
                    run_update = gr.update(choices=choices, value=snapshot.run_name)
                    results_update = f"{snapshot.run_name}:{epochs}:{snapshot.state}"
                    announced_run, announced_epochs = snapshot.run_name, epochs
            yield (
                sent.value("status", views.status_html(snapshot)),
                sent.value("chart", views.chart_html(snapshot)),
                sent.value("samples", views.samples_gallery(snapshot)),
                sent.value("log", views.log_text(snapshot)),
                sent.value("task_id", snapshot.task_id if snapshot and snapshot.running else ""),
                run_update,
                results_update,
                sent.value("new_cards", _registered_stems(snapshot)),
            )
            if snapshot is None or not snapshot.running:
                return
            time.sleep(POLL_SECONDS)

    # --- handlers: results --------------------------------------------------------------------------
    def _runs(self) -> list[str]:
        try:
            return self.actions.list_runs()
        except (ActionError, *USER_ERRORS) as error:
            logger.warning("listing runs: %s", error)
            return []

    def on_refresh_runs(self, current: str | None):
        choices = self._runs()
        value = current if current in choices else (choices[0] if choices else None)
        return gr.update(choices=choices, value=value)

    def on_run_chosen(self, run_name: str | None):
        """The grid fields from the run's own sample settings (its size: a 128 px run is compared at 128)."""
        unchanged = [gr.update()] * 5
        if not run_name:
            return unchanged
        try:
            config = self.actions.load_run_config(run_name, TrainingConfig())
        except (ActionError, *USER_ERRORS) as error:
            logger.info("no grid defaults from run %s: %s", run_name, error)
            return unchanged
        return (
            config.sample_steps,
            config.sample_sampler,
            config.sample_cfg_scale,
            config.sample_width or config.resolution,
            config.sample_height or config.resolution,
        )

    @staticmethod
    def _grid_settings(steps, sampler, cfg, width, height) -> GridSettings:
        return GridSettings(
            steps=int(steps or 20),
            sampler=(sampler or "Euler a").strip(),
            cfg_scale=float(cfg or 7.0),
            width=int(width or 512),
            height=int(height or 512),
        )

    def on_results(self, run_name, extra, negative, seeds, weight_axis, steps, sampler, cfg, width, height):
        disabled = gr.update(interactive=False)
        if not run_name:
            return views.epochs_table([]), [], "", disabled, disabled, ""
        try:
            entries = self.actions.epochs(run_name)
        except (ActionError, *USER_ERRORS) as error:
            return views.epochs_table([]), [], "", disabled, disabled, _error_message(error)
        table = views.epochs_table([(entry.stem, entry.notes) for entry in entries])
        gallery = [(str(entry.preview_path), entry.stem) for entry in entries if entry.preview_path]
        try:
            comparison = self.actions.comparison(
                run_name,
                extra_prompt=extra or "",
                negative_prompt=negative or "",
                seed_count=int(seeds or 4),
                weight_axis=bool(weight_axis),
            )
            infotext = self.actions.comparison_infotext(
                comparison, self._grid_settings(steps, sampler, cfg, width, height)
            )
        except (ActionError, *USER_ERRORS) as error:
            return table, gallery, "", disabled, disabled, _error_message(error)
        enabled = gr.update(interactive=True)
        return table, gallery, infotext, enabled, enabled, ""

    def on_render_grid(
        self, run_name, extra, negative, seeds, weight_axis, steps, sampler, cfg, width, height
    ):
        try:
            comparison = self.actions.comparison(
                run_name or "",
                extra_prompt=extra or "",
                negative_prompt=negative or "",
                seed_count=int(seeds or 4),
                weight_axis=bool(weight_axis),
            )
            result = self.actions.render_grid(
                comparison, self._grid_settings(steps, sampler, cfg, width, height)
            )
        except (ActionError, *USER_ERRORS, RuntimeError) as error:
            return None, _error_message(error)
        where = f"Saved as {result.path}" if result.path else "Not saved"
        return result.image, _message(where)


class _ChangedOnly:
    """Remembers what a stream last sent per output; unchanged values go out as ``gr.update()``."""

    def __init__(self) -> None:
        self._last: dict[str, Any] = {}

    def value(self, key: str, value: Any) -> Any:
        if key in self._last and self._last[key] == value:
            return gr.update()
        self._last[key] = value
        return value


def _registered_stems(snapshot: JobSnapshot | None) -> str:
    """The run's epochs with Lora cards (a JSON list), for the page's card refresh."""
    stems: Iterable[str] = (
        [result.stem for result in snapshot.epoch_results if result.registered] if snapshot else []
    )
    return json.dumps(list(stems))


def _upload_path(upload: Any, missing: str) -> str:
    """The server-side path of an upload (a tempfile wrapper, a dict or a path); ``missing`` is the
    message when there is none; a client-named server path is refused (see ``ui/uploads.py``)."""
    if upload is None:
        raise ActionError(missing)
    if isinstance(upload, RefusedUpload):
        raise ActionError(upload.message)
    if isinstance(upload, str):
        return upload
    if isinstance(upload, dict):
        return str(upload.get("name", ""))
    return str(getattr(upload, "name", ""))


def build_tab(services: HostServices, jobs: TrainingJobs) -> gr.Blocks:
    """The tab as a gradio Blocks (render it inside a page, or launch it on its own)."""
    return _Tab(services, jobs).build()
