"""The running WebUI (stand-ins for A1111 v1.10.1's ``modules``, tests/webui/stand_ins.py): samples
whose infotext reproduces them from the epoch file, sample renders that cannot reload the model, the
confinement roots that no browser or API user can move, Forge refused at Train, and each phase's ETA."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_lora_trainer.outputs.samples import SampleRequest
from lib_lora_trainer.paths import PathNotAllowedError
from lib_lora_trainer.ui.jobs import JobRefused, TrainingJobs
from lib_lora_trainer.ui.standalone import parse_infotext
from tests.ui.conftest import make_dataset, tiny_config
from tests.webui import stand_ins

MODEL_HASH = "0123456789abcdef" * 4


@pytest.fixture
def webui(monkeypatch, tmp_path):
    return stand_ins.install(monkeypatch, tmp_path)


def epoch_file(folder: Path, stem: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.safetensors"
    save_file({"lora_unet_x.alpha": torch.ones(())}, str(path), metadata={"sshs_model_hash": MODEL_HASH})
    return path


def request(prompt: str = "ohwx, portrait <lora:alice-000001:1>") -> SampleRequest:
    return SampleRequest(prompt, "lowres", 42, 20, "Euler a", 7.0, 64, 64)


def test_a_samples_infotext_reproduces_it_from_the_epoch_file(webui, tmp_path):
    from lib_lora_trainer.webui.samples import A1111SampleRenderer

    loras = tmp_path / "models" / "Lora" / "character_trainer"
    epoch_file(loras, "alice-000001")
    (sample,) = A1111SampleRenderer(lora_folder=loras).render(
        [request()], tmp_path / "samples", "alice-000001"
    )

    assert sample.infotext == (
        "ohwx, portrait <lora:alice-000001:1>\nNegative prompt: lowres\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 42, Size: 64x64, Model hash: ac6f958213, "
        'Model: random-sd15, Lora hashes: "alice-000001: 0123456789ab"'
    )
    fields = parse_infotext(sample.infotext)  # what PNG Info / "Send to txt2img" read back
    assert fields["Prompt"] == request().prompt and fields["Lora hashes"] == "alice-000001: 0123456789ab"
    (saved_path, saved_info) = webui.recorder.saved[-1]
    assert saved_info == sample.infotext and saved_path == sample.path
    (p,) = webui.recorder.processings
    assert p.disable_extra_networks  # rendered with the adapters in memory, nothing loaded from disk


def test_sample_renders_cannot_reload_weights_into_the_trained_model(webui, tmp_path):
    from lib_lora_trainer.webui.samples import A1111SampleRenderer

    model = webui.shared.sd_model
    title = model.sd_checkpoint_info.title
    webui.shared.opts.data["fp8_storage"] = "Enable"  # FP8 switched on in the settings mid-run
    webui.shared.opts.data["sd_model_checkpoint"] = "other.safetensors [1234]"  # another checkpoint chosen
    del webui.sd_models.checkpoint_aliases[title]  # and the checkpoint list refreshed without ours
    samples = A1111SampleRenderer().render([request(), request("ohwx")], tmp_path / "samples", "alice-000001")

    assert len(samples) == 2 and webui.recorder.reloads == []
    assert webui.shared.sd_model is model and model.sd_checkpoint_info.title == title and not model.fp8
    assert webui.shared.opts.data["sd_model_checkpoint"] == "other.safetensors [1234]"  # the user's choice
    webui.sd_models.reload_model_weights()  # after the render, A1111's reloads work again
    assert webui.recorder.reloads == [("fp8", "other.safetensors [1234]")]


def test_unload_checkpoint_is_refused_only_while_the_model_is_in_use(webui):
    from lib_lora_trainer.webui.model_guard import ModelInUse, model_changes_refused

    unload = webui.sd_models.unload_model_weights  # the function A1111's button holds
    with model_changes_refused():
        with pytest.raises(ModelInUse, match="being trained"):
            unload()
        assert webui.sd_models.reload_model_weights() is webui.shared.sd_model
    assert webui.recorder.moved_to_cpu == []
    unload()
    assert webui.recorder.moved_to_cpu == [webui.shared.sd_model]


def test_forge_is_refused_when_train_is_pressed(monkeypatch, tmp_path, caplog):
    stand_ins.install(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "modules_forge", types.ModuleType("modules_forge"))
    from lib_lora_trainer.webui import extension
    from lib_lora_trainer.webui.services import A1111Services

    services = A1111Services()
    dataset = make_dataset(Path(services.defaults().dataset_dir) / "alice")
    with pytest.raises(JobRefused, match="Forge"):
        TrainingJobs(services).start(tiny_config(dataset))
    extension.on_app_started(None, None)
    assert "Stable Diffusion WebUI Forge" in caplog.text  # said once at start-up too


def test_no_checkpoint_is_refused_when_train_is_pressed(webui):
    from lib_lora_trainer.webui.services import A1111Services

    services = A1111Services()
    dataset = make_dataset(Path(services.defaults().dataset_dir) / "alice")
    webui.shared.sd_model = None
    with pytest.raises(JobRefused, match="No Stable Diffusion checkpoint"):
        TrainingJobs(services).start(tiny_config(dataset))


def test_confinement_roots_ignore_settings_anyone_can_change(monkeypatch, tmp_path):
    webui = stand_ins.install(monkeypatch, tmp_path, cmd_opts={"disable_extension_access": True})
    from lib_lora_trainer.webui.services import A1111Services

    private = make_dataset(tmp_path / "private" / "photos")
    # what any UI user, or /sdapi/v1/options without --api-auth, can do without --hide-ui-dir-config
    webui.shared.opts.data["lct_datasets_dir"] = str(tmp_path / "private")
    webui.shared.opts.data["lct_tagger_models_dir"] = str(tmp_path / "private")
    services = A1111Services()
    policy = services.path_policy()
    assert policy.confined and tmp_path / "private" not in policy.roots
    with pytest.raises(PathNotAllowedError):
        policy.check(str(private))
    assert services.defaults().dataset_dir == str(tmp_path / "datasets")
    assert services.defaults().tagger_models_dir == str(tmp_path / "models" / "wd14_tagger")

    monkeypatch.setattr(webui.shared.cmd_opts, "disable_extension_access", False)  # a local WebUI
    assert services.defaults().dataset_dir == str(tmp_path / "private")  # the setting is used again


def test_each_phase_restarts_the_progress_apis_clock(webui, tmp_path):
    from lib_lora_trainer.webui.services import A1111JobFrame, A1111Services

    # the remembered form lies beside config.json, in --data-dir
    assert A1111Services().form_memory_path() == tmp_path / "lora_char_trainer-last-form.json"

    webui.shared.state.time_start = 0.0
    A1111JobFrame("task(x)").begin_phase()
    assert webui.shared.state.time_start > 0


def test_a_new_epoch_freshens_only_the_lora_pages_file_listing(webui, tmp_path):
    from lib_lora_trainer.webui.services import A1111Services

    A1111Services().notify_lora_added("alice-000001", tmp_path / "alice-000001.safetensors")
    assert webui.networks.announced == ["alice-000001"]
    resets = {page.name: page.lister.resets for page in webui.ui_extra_networks.extra_pages}
    assert resets == {"textual inversion": 0, "lora": 1, "checkpoints": 0}
