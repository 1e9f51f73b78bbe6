"""The tab's A1111 services on stand-ins for A1111's ``modules`` (tests/webui/stand_ins.py): jobs under
``queue_lock`` framed for the progress API, A1111's Interrupt, Lora refresh by stem, paste-params
binding, settings, X/Y/Z axes found by label, txt2img samples with the checkpoint pinned, the prompt
cache reset and the random generators restored, path confinement when non-local, and the glue."""

from __future__ import annotations

import os
import runpy
import threading
import time
from pathlib import Path

import pytest
import torch

from lib_lora_trainer.outputs.compare import build_comparison
from lib_lora_trainer.outputs.samples import EulerSampleRenderer, SampleRequest
from lib_lora_trainer.paths import PathNotAllowedError
from lib_lora_trainer.ui.jobs import TrainingJobs
from lib_lora_trainer.ui.services import GridSettings
from tests.engine.helpers import host_fingerprint
from tests.ui.conftest import make_dataset, tiny_config
from tests.webui import stand_ins

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 300


@pytest.fixture(scope="module")
def tiny_host():
    from lib_lora_trainer.model.standalone import build_random_host

    return build_random_host("tiny", seed=5)


@pytest.fixture
def webui(monkeypatch, tmp_path):
    return stand_ins.install(monkeypatch, tmp_path)


def a1111_services(tiny_host):
    """The real A1111 services; only the model host and the sampler are the stand-alone ones."""
    from lib_lora_trainer.ui.standalone import _vae_decoder
    from lib_lora_trainer.webui.services import A1111Services

    class Services(A1111Services):
        def training_host(self):
            return tiny_host

        def sample_renderer(self):
            return EulerSampleRenderer(tiny_host, _vae_decoder(tiny_host))

    return Services()


def test_a_run_holds_queue_lock_reports_progress_and_stops_on_a1111_interrupt(webui, tiny_host, tmp_path):
    services = a1111_services(tiny_host)
    dataset = make_dataset(Path(services.defaults().dataset_dir) / "alice")
    before = host_fingerprint(tiny_host)
    seen, api_call = {}, {}

    def txt2img_api_call():  # what /sdapi/v1/txt2img does: `with queue_lock:` around the generation
        api_call["asked"] = time.time()
        with webui.call_queue.queue_lock:
            api_call["ran"] = time.time()

    def on_epoch(stem):
        state = webui.shared.state
        seen.update(current=webui.progress.current_task, job_count=state.job_count, text=state.textinfo)
        caller = threading.Thread(target=txt2img_api_call)
        caller.start()
        seen["caller"] = caller
        time.sleep(0.2)
        seen["api_waiting"] = "ran" not in api_call
        state.interrupt()  # A1111's Interrupt button

    webui.networks.update_available_networks_by_names = lambda names: (
        webui.networks.announced.extend(names),
        on_epoch(names[0]),
    )
    job = TrainingJobs(services).start(tiny_config(dataset, epochs=3), task_id="task(abc)")
    assert job.wait(WAIT_S)
    seen["caller"].join(WAIT_S)
    snapshot = job.snapshot()

    assert snapshot.state == "interrupted"
    assert seen["current"] == "task(abc)" and seen["job_count"] == snapshot.total_steps == 12
    assert seen["text"].startswith("Training alice: step 4/12, epoch 1/3")
    assert seen["api_waiting"] and api_call["ran"] > api_call["asked"]
    assert webui.progress.finished_tasks == ["task(abc)"] and webui.progress.current_task is None
    assert webui.shared.state.history == [("begin", "task(abc)"), ("end", "task(abc)")]
    assert webui.networks.announced == ["alice-000001"]
    folder = Path(webui.shared.cmd_opts.lora_dir) / "character_trainer"
    assert (folder / "alice-000001.safetensors").is_file() and not (
        folder / "alice-000002.safetensors"
    ).exists()
    assert host_fingerprint(tiny_host) == before


def test_a_job_waits_in_the_queue_while_a_generation_holds_the_lock(webui):
    from lib_lora_trainer.webui.services import A1111Services

    services, order = A1111Services(), []
    with webui.call_queue.queue_lock:
        worker = threading.Thread(target=lambda: order.append(_run_job(services)))
        worker.start()
        time.sleep(0.2)
        assert webui.progress.pending_tasks == {"task(tag-x)": True}  # the page shows "in queue"
        order.append("generation")
    worker.join(WAIT_S)
    assert order == ["generation", "job"]


def _run_job(services):
    with services.exclusive_job("task(tag-x)", "WD14 tagging") as frame:
        frame.progress(3, 4, "Tagging 3/4")
        from modules import shared

        assert (shared.state.job_no, shared.state.job_count, shared.state.textinfo) == (3, 4, "Tagging 3/4")
        assert not frame.interrupted()
    return "job"


@pytest.mark.parametrize(
    "flags, confined",
    [
        ({}, False),
        ({"disable_extension_access": True}, True),  # --listen / --share / --server-name
    ],
)
def test_paths_are_confined_only_when_the_webui_is_non_local(monkeypatch, tmp_path, flags, confined):
    stand_ins.install(monkeypatch, tmp_path, cmd_opts=flags)
    from lib_lora_trainer.webui.services import A1111Services

    policy = A1111Services().path_policy()
    assert policy.confined is confined
    datasets = tmp_path / "datasets"
    assert set(policy.roots) == {datasets, tmp_path / "models" / "Lora", tmp_path / "models" / "LyCORIS"}
    inside = make_dataset(datasets / "alice")
    twin = make_dataset(tmp_path / "datasets_private")
    os.symlink(twin, datasets / "shortcut")
    assert policy.check(str(inside)) == inside
    for path in (twin, datasets / "shortcut", datasets / ".." / "datasets_private"):
        if confined:
            with pytest.raises(PathNotAllowedError):
                policy.check(str(path))
        else:
            assert policy.check(str(path)) == path


def test_lora_refresh_paste_binding_and_folders(webui, tmp_path):
    from lib_lora_trainer.webui import settings
    from lib_lora_trainer.webui.services import A1111Services

    services = A1111Services()
    services.notify_lora_added("alice-000001", tmp_path / "alice-000001.safetensors")
    assert webui.networks.announced == ["alice-000001"]

    button, infotext = object(), object()
    services.connect_send_to_txt2img(button, infotext)
    (binding,) = webui.infotext_utils.registered_param_bindings
    assert (binding.paste_button, binding.tabname, binding.source_text_component) == (
        button,
        "txt2img",
        infotext,
    )

    settings.register()
    labels = webui.shared.opts.data_labels
    assert set(labels) == {o.key for o in settings.options(str(tmp_path), str(tmp_path / "models"))}
    assert all(
        info.section == settings.SECTION and info.category_id == "training" for info in labels.values()
    )
    assert {"lct_datasets_dir", "lct_tagger_models_dir", "lct_lora_subfolder"} <= webui.shared.restricted_opts
    webui.shared.opts.data["lct_samples_subfolder"] = "trainer/samples"
    assert services.samples_root() == tmp_path / "outputs" / "txt2img-images" / "trainer" / "samples"
    webui.shared.opts.data["lct_samples_subfolder"] = "../elsewhere"
    with pytest.raises(PathNotAllowedError):
        services.samples_root()
    assert services.defaults().tagger_models_dir == str(tmp_path / "models" / "wd14_tagger")
    assert services.lora_roots()[0] == tmp_path / "models" / "Lora"


def test_render_grid_finds_the_axes_by_label_and_pins_the_checkpoint(webui):
    from lib_lora_trainer.webui.services import A1111Services

    services = A1111Services()
    comparison = build_comparison(
        ["alice-000001", "alice-000002"], "ohwx", seed_count=2, rng_seed=3, weights=(0.6, 1.0)
    )
    assert services.txt2img_axis_labels()[8] == "Prompt S/R"
    result = services.render_grid(comparison, GridSettings(steps=4, width=64, height=64), frame=None)

    ((p, args),) = webui.recorder.xyz_runs
    assert args[0] == 8 and args[1] == "alice-000001, alice-000002"  # X = Prompt S/R, by label
    assert args[3] == 1 and args[4] == comparison.y_values  # Y = Seed
    assert args[6] == 8 and args[7] == ":0.6>, :1>"  # Z = weights as a second Prompt S/R
    assert len(args) == 18
    assert p.prompt == "ohwx <lora:alice-000001:0.6>" and p.steps == 4 and p.closed
    assert p.override_settings == {"sd_model_checkpoint": "random-sd15.safetensors [ac6f958213]"}
    assert result.path.name == "xyz_grid-0000-1.png" and result.infotext == "grid infotext"


def test_samples_render_through_txt2img_pinned_with_fresh_conditioning_and_rng_restored(webui, tmp_path):
    from lib_lora_trainer.webui.samples import A1111SampleRenderer

    processing = webui.processing
    processing.StableDiffusionProcessing.cached_c = ["stale", 1]
    requests = [
        SampleRequest(f"ohwx, pose {i} <lora:alice-000001:1>", "lowres", 42 + i, 20, "Euler a", 7.0, 64, 64)
        for i in range(2)
    ]
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = A1111SampleRenderer().render(requests, tmp_path / "samples", "alice-000001")
    assert torch.equal(torch.rand(3), expected)  # sampling did not move the training RNG
    second = A1111SampleRenderer().render(requests[:1], tmp_path / "samples", "alice-000001")

    assert [s.path.name for s in first] == ["alice-000001-00.png", "alice-000001-01.png"]
    assert second[0].path.name == "alice-000001-00-1.png"  # nothing is overwritten
    assert webui.recorder.cached_c_at_render == [[None, None]] * 3  # the prompt cache was reset each time
    assert processing.StableDiffusionProcessing.cached_c == [None, None]
    for p in webui.recorder.processings:
        assert p.disable_extra_networks and p.closed and p.do_not_save_samples
        assert p.override_settings == {
            "sd_model_checkpoint": "random-sd15.safetensors [ac6f958213]",
            "CLIP_stop_at_last_layers": 1,
        }
    assert first[0].infotext.startswith("ohwx, pose 0 <lora:alice-000001:1>")
    assert first[0].image.info["parameters"] == first[0].infotext
    assert webui.shared.state.current_image is second[0].image


def test_the_script_registers_the_tab_settings_and_start_up_note(webui, tmp_path):
    import gradio as gr

    runpy.run_path(str(REPO / "scripts" / "lora_char_trainer.py"))
    callbacks = dict(webui.script_callbacks.registered)
    assert set(callbacks) == {"on_ui_settings", "on_ui_tabs", "on_app_started"}

    callbacks["on_ui_settings"]()
    ((tab, title, elem_id),) = callbacks["on_ui_tabs"]()
    assert isinstance(tab, gr.Blocks) and (title, elem_id) == ("Train Character LoRA", "lora_char_trainer")
    (binding,) = webui.infotext_utils.registered_param_bindings  # "Compare in txt2img"
    assert binding.tabname == "txt2img" and binding.paste_button.value == "Compare in txt2img"
    callbacks["on_app_started"](None, None)


def test_the_scoring_renderer_lets_the_lora_extension_load_each_epoch_from_disk(webui, tmp_path):
    from lib_lora_trainer.webui.services import A1111Services

    request = SampleRequest("ohwx <lora:alice-000002:0.75>", "", 1000, 4, "Euler a", 7.0, 64, 64)
    A1111Services().lora_renderer().render([request], tmp_path / "evaluation", "alice-000002-eval-00")
    (p,) = webui.recorder.processings
    assert not p.disable_extra_networks  # training's samples render the adapters in memory instead
    assert p.prompt == request.prompt and p.override_settings == {
        "sd_model_checkpoint": "random-sd15.safetensors [ac6f958213]",
        "CLIP_stop_at_last_layers": request.clip_skip,  # the run's clip skip, through the override only
    }
