"""What the tab's buttons do (without a browser): scan, crop preview, WD14 tagging, caption editing,
settings files, the comparison of a finished run, the grid, and path confinement."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from lib_lora_trainer.captioning import ExistingCaptionMode
from lib_lora_trainer.config import ConfigError
from lib_lora_trainer.paths import PathNotAllowedError
from lib_lora_trainer.ui.actions import (
    ActionError,
    TabActions,
    TaggerChoice,
    default_tagger_model,
    default_tagger_thresholds,
)
from lib_lora_trainer.ui.jobs import JobRefused
from lib_lora_trainer.ui.services import GridSettings
from lib_lora_trainer.ui.standalone import StandaloneServices, parse_infotext
from tests.captioning.wd14_fixtures import write_model_folder
from tests.ui.conftest import make_dataset, tiny_config

CONVNEXT_V2 = "wd-v1-4-convnext-tagger-v2"


@pytest.fixture
def actions(services, jobs) -> TabActions:
    return TabActions(services, jobs)


def test_scan_reports_the_dataset_and_previews_the_crops(actions, dataset):
    result = actions.scan(tiny_config(dataset, resolution=64))
    assert "2 in 1 folder(s)" in result.report_text and "4 with repeats" in result.report_text
    assert [caption for _, caption in result.previews] == ["img0.png -> 64x64", "img1.png -> 64x64"]
    assert {image.size for image, _ in result.previews} == {(64, 64)}
    with pytest.raises(ActionError, match="does not exist"):
        actions.scan(tiny_config(dataset / "missing"))


def test_caption_edits_keep_a_backup_and_can_be_undone(actions, dataset):
    config = tiny_config(dataset)
    first = str(dataset / "img0.png")
    assert actions.set_caption(config, first, "ohwx_alice,  smile ,, blue eyes") == "saved img0.txt"
    assert (dataset / "img0.txt").read_text(encoding="utf-8").strip() == "ohwx_alice, smile, blue eyes"
    assert list((dataset / ".lora_trainer_backup").glob("img0.txt.*.bak"))

    assert "2 caption(s) changed" in actions.bulk_edit(config, "add", "outdoors")
    assert actions.tag_frequency(config)[0] == ["ohwx_alice", 2]
    assert "1 caption(s) changed" in actions.bulk_edit(config, "replace", "smile", "grin")
    assert "1 caption(s) restored" in actions.bulk_edit(config, "undo", "")
    assert "smile" in (dataset / "img0.txt").read_text(encoding="utf-8")
    with pytest.raises(ActionError, match="Select an image"):
        actions.set_caption(config, "", "x")
    with pytest.raises(Exception, match="not an image of this dataset"):
        actions.set_caption(config, str(dataset.parent / "elsewhere.png"), "x")


def test_the_tagger_writes_captions_with_the_trigger_word_first(services, actions):
    write_model_folder(services.tagger_dir / CONVNEXT_V2, size=64)
    folder = make_dataset(services.datasets_dir / "untagged", caption=None)
    assert default_tagger_model(services.tagger_dir) == CONVNEXT_V2  # the installed model is offered first
    general, character = default_tagger_thresholds(CONVNEXT_V2)
    choice = TaggerChoice(CONVNEXT_V2, general, character, undesired_tags="long hair",
                          existing_captions=ExistingCaptionMode.SKIP.value)  # fmt: skip
    progress = []
    summary = actions.run_tagger(tiny_config(folder), choice, lambda done, total, name: progress.append(done))

    assert "Captions written: 2" in summary and progress[-1] == 2
    caption = (folder / "img0.txt").read_text(encoding="utf-8")
    assert caption.startswith("ohwx_alice, hatsune miku, 1girl")
    assert "long hair" not in caption
    assert services.frames[-1].reports[-1][:2] == (2, 2)  # tagging ran as a GPU job


def test_a_missing_tagger_model_is_explained_not_downloaded(actions, dataset):
    choice = TaggerChoice("wd-swinv2-tagger-v3", 0.35, 0.85)
    with pytest.raises(ActionError, match="downloads are off"):
        actions.run_tagger(tiny_config(dataset), choice)


def test_settings_files_partial_and_kohya(actions, tmp_path):
    base = tiny_config(tmp_path / "data")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"epochs": 7, "output_dir": "/elsewhere"}), encoding="utf-8")
    loaded = actions.load_config_file(str(partial), base)
    assert loaded.epochs == 7 and loaded.train_data_dir == base.train_data_dir
    assert loaded.output_dir == base.output_dir

    kohya = tmp_path / "kohya.json"
    kohya.write_text(json.dumps({"LoRA_type": "Standard", "network_dim": 64, "network_alpha": 32,
                                 "learning_rate": 0.0001, "epoch": 6}), encoding="utf-8")  # fmt: skip
    imported, summary = actions.import_kohya(str(kohya), base)
    assert (imported.network_dim, imported.network_alpha, imported.epochs) == (64, 32.0, 6)
    assert summary.startswith("Imported")

    toml = tmp_path / "run.toml"  # the same import takes an sd-scripts --config_file
    toml.write_text(
        '[network]\nnetwork_module = "lycoris.kohya"\nnetwork_dim = 16\nnetwork_alpha = 8\n'
        'network_args = ["algo=loha"]\nmax_train_epochs = 3\noutput_dir = "/elsewhere"\n'
    )
    imported, summary = actions.import_kohya(str(toml), base)
    assert (imported.network_type, imported.network_dim, imported.epochs) == ("loha", 16, 3)
    assert imported.output_dir == base.output_dir
    assert summary.startswith("Imported") and "from the sd-scripts config" in summary
    broken_toml = tmp_path / "broken.toml"
    broken_toml.write_text("network_dim = [", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        actions.import_kohya(str(broken_toml), base)

    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ActionError, match="JSON object"):
        actions.load_config_file(str(broken), base)


def test_a_finished_run_is_listed_compared_and_its_settings_load_again(services, jobs, actions, dataset):
    assert jobs.start(tiny_config(dataset, epochs=2, sample_every_n_epochs=0)).wait(300)
    assert actions.list_runs() == ["alice"]
    entries = actions.epochs("alice")
    assert [(e.epoch, e.stem) for e in entries] == [(1, "alice-000001"), (2, "alice-000002")]
    assert all(e.preview_path is None and "steps" in e.notes for e in entries)  # no samples: no preview

    comparison = actions.comparison("alice", extra_prompt="red scarf", seed_count=3, weight_axis=True)
    infotext = actions.comparison_infotext(comparison, GridSettings(steps=8, width=64, height=64))
    fields = parse_infotext(infotext)
    assert fields["Prompt"] == "ohwx_alice, red scarf <lora:alice-000001:0.6>"
    assert fields["X Type"] == "Prompt S/R" and fields["X Values"] == "alice-000001, alice-000002"
    assert fields["Y Type"] == "Seed" and len(fields["Y Values"].split(",")) == 3
    assert fields["Z Type"] == "Prompt S/R" and fields["Z Values"] == ":0.6>, :0.8>, :1>"
    assert "Model hash" not in infotext and "Lora hashes" not in infotext

    assert actions.load_run_config("alice", tiny_config(dataset, epochs=9)).epochs == 2
    with pytest.raises(ActionError, match="Choose a run"):
        actions.epochs("../alice")


def test_render_grid_loads_each_epoch_file(services, jobs, actions, dataset):
    assert jobs.start(tiny_config(dataset, epochs=2, sample_every_n_epochs=0)).wait(300)
    comparison = actions.comparison("alice", seed_count=1)
    assert actions.comparison("alice", seed_count=1).seeds == comparison.seeds  # the grid = what txt2img gets
    result = actions.render_grid(comparison, GridSettings(steps=2, width=64, height=64))
    assert result.image.width == 110 + 2 * 64 and result.image.height == 2 * 24 + 64
    assert result.path.parent == services.grids_dir and Image.open(result.path).info["parameters"]
    # the two columns differ: each was rendered with its own epoch's weights
    left = result.image.crop((110, 48, 174, 112)).tobytes()
    right = result.image.crop((174, 48, 238, 112)).tobytes()
    assert left != right


@pytest.fixture
def confined(tmp_path, tiny_host):
    services = StandaloneServices(tiny_host, tmp_path / "webui", confined=True)
    return services


def test_confined_paths_refuse_parent_references_symlinks_and_prefix_tricks(tmp_path, confined):
    from lib_lora_trainer.ui.jobs import TrainingJobs

    actions = TabActions(confined, TrainingJobs(confined))
    inside = make_dataset(confined.datasets_dir / "alice")
    outside = make_dataset(tmp_path / "private")
    prefix_twin = make_dataset(tmp_path / "webui" / "datasets_private")  # "/datasets" + "_private"
    link = confined.datasets_dir / "link"
    os.symlink(outside, link)

    assert "2 in 1 folder(s)" in actions.scan(tiny_config(inside)).report_text
    for path in (outside, prefix_twin, link, confined.datasets_dir / ".." / "datasets_private",
                 confined.datasets_dir / "alice" / ".." / "alice"):  # fmt: skip
        with pytest.raises(PathNotAllowedError):
            actions.scan(tiny_config(path))
        with pytest.raises(PathNotAllowedError):
            actions.captions(tiny_config(path))
        with pytest.raises(JobRefused, match="outside the allowed folders|contains '..'"):
            actions.jobs.start(tiny_config(path))
    with pytest.raises(JobRefused, match="outside the allowed folders"):
        actions.jobs.start(tiny_config(inside, reg_data_dir=str(outside)))
    with pytest.raises(JobRefused, match="outside the allowed folders"):
        actions.jobs.start(tiny_config(inside, network_weights=str(outside / "x.safetensors")))
    assert not list(confined.lora_dir.rglob("*"))
