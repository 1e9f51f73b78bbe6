"""The whole workflow in a real browser: Debian's Chromium, driven by Playwright, on a gradio 3.41 app
that hosts the tab over the tiny test model next to a stand-in for A1111's txt2img tab.

Choose a dataset folder, run the WD14 tagger (a generated ONNX model), edit a caption, train 2 epochs
(watching the status and the loss chart), reload the page mid-run and find the run again, see both
epoch files registered with their card JSON and preview, see the epochs scored (tiny ONNX and CLIP
scorers) with the recommended epoch's card carrying its weight, then "Compare in txt2img" and find the
prompt and the X/Y/Z plot fields filled from that epoch; a second scoring stopped part-way changes nothing.
Screenshots go to $LCT_SCREENSHOT_DIR (the README's come from here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from lib_lora_trainer.ui.jobs import TrainingJobs
from lib_lora_trainer.ui.scoring import scoring_for
from lib_lora_trainer.ui.standalone import StandaloneServices, build_app
from tests.captioning.wd14_fixtures import write_model_folder
from tests.evaluation.fixtures import write_models_dir
from tests.ui.conftest import TINY, make_dataset

CHROMIUM = os.environ.get("LCT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SETUP_HINT = "bash tools/setup_browser.sh installs both"
MISSING = [
    reason
    for reason, absent in (
        (
            f"the playwright package is not installed ({SETUP_HINT})",
            not importlib.util.find_spec("playwright"),
        ),
        (f"there is no Chromium at {CHROMIUM} ({SETUP_HINT})", not shutil.which(CHROMIUM)),
    )
    if absent
]
pytestmark = [pytest.mark.browser, pytest.mark.skipif(bool(MISSING), reason="; ".join(MISSING))]

TIMEOUT_MS = 240_000
SETTING_KEYS = (
    "resolution", "min_bucket_reso", "max_bucket_reso", "flat_repeats", "network_dim", "network_alpha",
    "unet_lr", "text_encoder_lr", "lr_scheduler", "batch_size", "mixed_precision", "save_precision",
    "sample_steps", "sample_width", "sample_height", "seed",
)  # fmt: skip
SCORING = dict(  # a small evaluation set, so that scoring the tiny model's epochs takes seconds
    evaluation_near_prompts=["ohwx_alice, portrait"],
    evaluation_far_prompts=["pencil drawing of ohwx_alice"],
    evaluation_seeds=2,
    evaluation_steps=2,
    evaluation_size=64,
)
SETTINGS = {key: TINY[key] for key in SETTING_KEYS} | SCORING


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def app_url(tmp_path, tiny_host):
    services = StandaloneServices(tiny_host, tmp_path / "webui")
    make_dataset(services.datasets_dir / "alice", count=3, caption=None)
    write_model_folder(services.tagger_dir / "wd-v1-4-convnext-tagger-v2", size=64)
    write_models_dir(services.scorer_dir)  # tiny face, character and CLIP scorers
    jobs = TrainingJobs(services)
    app = build_app(services, jobs)
    app.queue()
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", services, jobs
    finally:
        job = jobs.current()
        if job is not None:
            job.request_stop()
            job.wait(60)
        app.server.force_exit = True  # do not wait for the page's open queue connection
        app.close()


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def test_the_whole_workflow_in_chromium(app_url, browser_page, tmp_path):
    from playwright.sync_api import expect

    url, services, jobs = app_url
    page = browser_page
    shots = Path(os.environ.get("LCT_SCREENSHOT_DIR") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    dataset = services.datasets_dir / "alice"

    def open_tab() -> None:
        page.goto(url)
        page.locator("button", has_text="Train Character LoRA").first.click()

    def section(name: str) -> None:
        page.locator("#lct_sections button", has_text=name).first.click()

    def html(elem_id: str):
        return page.locator(f"#{elem_id}").first

    open_tab()
    # 1. the dataset folder, its report and the crops
    page.locator("#lct_train_data_dir textarea").fill(str(dataset))
    page.locator("#lct_scan").click()
    expect(page.locator("#lct_report textarea")).to_have_value(lambda_contains("3 in 1 folder(s)"))
    expect(page.locator("#lct_crops img")).to_have_count(3)
    page.screenshot(path=str(shots / "01-dataset.png"), full_page=True)

    # 2. WD14 captions, then one caption edited in place
    section("2. Captions")
    page.locator("#lct_trigger_word textarea").fill("ohwx_alice")
    page.locator("#lct_run_tagger").click()
    expect(page.locator("#lct_tag_summary textarea")).to_have_value(lambda_contains("Captions written: 3"))
    page.locator("#lct_caption_gallery .thumbnail-item").first.click()
    expect(page.locator("#lct_caption textarea")).to_have_value(lambda_contains("ohwx_alice, hatsune miku"))
    page.locator("#lct_caption textarea").fill("ohwx_alice, red scarf, smile")
    page.locator("#lct_save_caption").click()
    expect(html("lct_caption_message")).to_contain_text("saved img0.txt")
    assert (dataset / "img0.txt").read_text(encoding="utf-8").strip() == "ohwx_alice, red scarf, smile"
    assert (dataset / "img1.txt").read_text(encoding="utf-8").startswith("ohwx_alice, hatsune miku")
    page.screenshot(path=str(shots / "02-captions.png"), full_page=True)

    # 3. settings: a saved settings file for the tiny model, then 2 epochs and the name by hand
    section("3. Training")
    settings_file = tmp_path / "tiny-settings.json"
    settings_file.write_text(json.dumps(SETTINGS), encoding="utf-8")
    page.locator("#lct_import_settings").get_by_text("Import or load settings").click()
    page.locator("#lct_config_file input[type=file]").set_input_files(str(settings_file))
    expect(page.locator("#lct_config_file")).to_contain_text("tiny-settings.json")
    page.locator("#lct_load_config").click()
    expect(html("lct_settings_message")).to_contain_text("Settings loaded.")
    expect(page.locator("#lct_resolution input")).to_have_value("64")
    page.locator("#lct_epochs input").fill("2")
    page.locator("#lct_output_name textarea").fill("alice")
    page.screenshot(path=str(shots / "03-training.png"), full_page=False)

    # 4. train: the status and the loss chart update while it runs; a reload finds the run again
    section("4. Run")
    page.locator("#lct_train").click()
    expect(html("lct_run_message")).to_contain_text("Training alice started")
    steps_seen = set()
    deadline = time.time() + TIMEOUT_MS / 1000
    while time.time() < deadline:
        status = page.locator("#lct_status .lct-status")
        state = status.get_attribute("data-state") or ""
        if state == "training":
            steps_seen.add(int(status.get_attribute("data-step") or 0))
        if state in ("completed", "failed", "interrupted") or len(steps_seen) >= 2:
            break
        page.wait_for_timeout(150)
    page.reload()
    page.locator("button", has_text="Train Character LoRA").first.click()
    section("4. Run")
    expect(html("lct_status")).to_contain_text("alice")  # the page picked the run up again
    # the run goes on while the page reloads: on a busy machine it may need more than expect's 5 s
    expect(page.locator("#lct_status .lct-status")).to_have_attribute(
        "data-state", "completed", timeout=TIMEOUT_MS
    )
    assert len(steps_seen) >= 2 or jobs.current().snapshot().total_steps <= 2, steps_seen
    expect(html("lct_status")).to_contain_text("Step 12 / 12")
    chart = page.locator("#lct_chart svg.lct-loss-chart")
    assert int(chart.get_attribute("data-points")) >= 1 and chart.get_attribute("data-epochs") == "2"
    expect(page.locator("#lct_samples img")).to_have_count(6)  # 3 default prompts x 2 epochs
    page.screenshot(path=str(shots / "04-run.png"), full_page=True)

    folder = services.lora_dir / "character_trainer"
    for stem in ("alice-000001", "alice-000002"):
        assert (folder / f"{stem}.safetensors").is_file()
        assert (
            json.loads((folder / f"{stem}.json").read_text(encoding="utf-8"))["activation text"]
            == "ohwx_alice"
        )
        assert (folder / f"{stem}.preview.png").is_file()
    assert services.announced == ["alice-000001", "alice-000002"]

    # 5. results: the epochs are scored after training; the verdict picks an epoch and a weight, which
    # its card carries; then "Compare in txt2img" fills the txt2img fields from that epoch
    section("5. Results")
    expect(page.locator("#lct_run_choice input")).to_have_value("alice")
    expect(page.locator("#lct_epoch_list li")).to_have_count(2)
    expect(page.locator("#lct_epoch_previews img")).to_have_count(2)
    # scoring runs after training (in the GPU queue): on a busy machine it may need more than 5 s
    expect(page.locator("#lct_scores .lct-verdict")).to_contain_text(
        "Recommended: alice-00000", timeout=TIMEOUT_MS
    )
    expect(page.locator("#lct_scores .lct-scoring-state")).to_have_attribute("data-state", "completed")
    expect(page.locator("#lct_scores table.lct-score-table tr")).to_have_count(4)  # header, base, 2 epochs
    scores = json.loads((folder / "alice.lora_trainer_scores.json").read_text(encoding="utf-8"))
    recommended = scores["recommended"]
    stem, weight = recommended["stem"], recommended["weight"]
    expect(page.locator("#lct_scores tr.lct-recommended")).to_have_attribute(
        "data-epoch", str(recommended["epoch"])
    )
    memorised = [line for line in scores["warnings"] if "memorising" in line]
    assert len(memorised) <= 2 and all(line.startswith("Epoch ") for line in memorised)  # one per epoch
    card = json.loads((folder / f"{stem}.json").read_text(encoding="utf-8"))
    assert card["preferred weight"] == weight and "Recommended epoch" in card["notes"]
    expect(page.locator("#lct_compare_infotext textarea")).to_have_value(lambda_contains("X/Y/Z plot"))
    expect(page.locator("#lct_compare_infotext textarea")).to_have_value(
        lambda_contains(f"<lora:{stem}:{weight:g}>")
    )
    page.locator("#lct_scores").first.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "05-results.png"), full_page=True)
    page.locator("#lct_compare").click()
    expect(page.locator("#txt2img_prompt textarea")).to_have_value(f"ohwx_alice <lora:{stem}:{weight:g}>")
    expect(page.locator("#script_list input")).to_have_value("X/Y/Z plot")
    expect(page.locator("#script_txt2img_xyz_plot_x_type input")).to_have_value("Prompt S/R")
    other = "alice-000002" if stem == "alice-000001" else "alice-000001"
    expect(page.locator("#script_txt2img_xyz_plot_x_values textarea")).to_have_value(f"{stem}, {other}")
    expect(page.locator("#script_txt2img_xyz_plot_y_type input")).to_have_value("Seed")
    seeds = page.locator("#script_txt2img_xyz_plot_y_values textarea").input_value()
    assert len([seed for seed in seeds.split(",") if seed.strip().isdigit()]) == 4
    page.screenshot(path=str(shots / "06-compare-in-txt2img.png"), full_page=False)

    # 6. "Score epochs" again, stopped part-way: the epochs, cards and earlier scores stay as they were
    page.locator("button", has_text="Train Character LoRA").first.click()
    section("5. Results")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    page.locator("#lct_score_epochs").click()
    expect(page.locator("#lct_scores .lct-scoring-state")).to_have_attribute(
        "data-state", "scoring", timeout=TIMEOUT_MS
    )
    page.locator("#lct_stop_scoring").click()
    expect(page.locator("#lct_scores .lct-scoring-state")).to_have_attribute("data-state", "stopped")
    scoring_job = scoring_for(services, jobs).current()
    assert scoring_job.wait(60) and scoring_job.snapshot().state == "stopped"  # the job itself has ended
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    expect(page.locator("#lct_scores .lct-verdict")).to_contain_text(f"Recommended: {stem}")


def lambda_contains(text: str):
    """A regular expression matching any value that contains ``text``."""
    import re

    return re.compile(re.escape(text))


SD_SCRIPTS_TOML = """
[additional_network_arguments]
network_module = "lycoris.kohya"
network_dim = 24
network_alpha = 12
network_args = ["algo=locon", "conv_dim=8", "conv_alpha=4"]

[optimizer_arguments]
optimizer_type = "Prodigy"
optimizer_args = ["d_coef=2", "safeguard_warmup=True"]
learning_rate = 1.0
lr_scheduler = "cosine"

[training_arguments]
max_train_epochs = 8
mixed_precision = "bf16"
unsupported_option_of_some_fork = 3
"""


def test_an_sd_scripts_toml_is_imported_with_its_report(app_url, browser_page, tmp_path):
    from playwright.sync_api import expect

    url, _services, _jobs = app_url
    page = browser_page
    page.goto(url)
    page.locator("button", has_text="Train Character LoRA").first.click()
    page.locator("#lct_sections button", has_text="3. Training").first.click()
    toml_file = tmp_path / "alice_locon.toml"
    toml_file.write_text(SD_SCRIPTS_TOML, encoding="utf-8")
    page.locator("#lct_import_settings").get_by_text("Import or load settings").click()
    page.locator("#lct_kohya_file input[type=file]").set_input_files(str(toml_file))
    expect(page.locator("#lct_kohya_file")).to_contain_text("alice_locon.toml")
    page.locator("#lct_import_kohya").click()
    message = page.locator("#lct_settings_message").first
    expect(message).to_contain_text("sd-scripts")
    expect(message).to_contain_text("unsupported_option_of_some_fork")  # reported, not dropped
    expect(page.locator("#lct_network_dim input")).to_have_value("24")
    expect(page.locator("#lct_epochs input")).to_have_value("8")
    shots = Path(os.environ.get("LCT_SCREENSHOT_DIR") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    message.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "07-import-sd-scripts.png"), full_page=False)
