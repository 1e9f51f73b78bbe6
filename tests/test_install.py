import json
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lib_lora_trainer import install_support
from lib_lora_trainer.install_support import (
    PEFT_REQUIREMENT,
    constraints_text,
    install_missing,
    installed_distributions,
    launch_pip_runner,
    pip_arguments,
    plan_install,
    report_result,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# What a real A1111 v1.10.1 venv holds (a part of it): the pins that must not move.
A1111_VENV = {
    "torch": "2.1.2+cu121",
    "transformers": "4.30.2",
    "accelerate": "0.21.0",
    "protobuf": "3.20.0",
    "numpy": "1.26.2",
    "safetensors": "0.4.2",
    "gradio": "3.41.2",
    "pillow": "9.5.0",
}


def never_asked() -> bool:
    raise AssertionError("CUDA must only be checked when onnxruntime has to be installed")


class RecordingRunner:
    """Records the pip calls and the constraints file as pip would read it."""

    def __init__(self, fail: bool = False):
        self.calls: list[list[str]] = []
        self.constraints: list[str] = []
        self.fail = fail

    def __call__(self, arguments: list[str], description: str) -> None:
        self.calls.append(arguments)
        constraints = Path(arguments[arguments.index("--constraint") + 1])
        self.constraints.append(constraints.read_text(encoding="utf-8"))
        if self.fail:
            raise subprocess.CalledProcessError(1, ["pip", *arguments])


def write_distribution(site: Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
    )


def test_installed_distributions_reads_names_and_versions(tmp_path: Path) -> None:
    write_distribution(tmp_path, "Pillow", "9.5.0")
    write_distribution(tmp_path, "torch", "2.1.2+cu121")
    write_distribution(tmp_path, "open_clip_torch", "2.20.0")
    write_distribution(tmp_path, "broken", "not a version")
    assert installed_distributions([str(tmp_path)]) == {
        "pillow": "9.5.0",
        "torch": "2.1.2+cu121",
        "open-clip-torch": "2.20.0",
    }


def test_plan_installs_peft_and_cpu_onnxruntime_when_both_are_missing() -> None:
    plan = plan_install(A1111_VENV, cuda=lambda: False)
    assert plan.to_install == (PEFT_REQUIREMENT, "onnxruntime")


def test_plan_picks_onnxruntime_gpu_when_torch_has_cuda() -> None:
    plan = plan_install({**A1111_VENV, "peft": "0.13.2"}, cuda=lambda: True)
    assert plan.to_install == ("onnxruntime-gpu",)
    assert any("GPU" in message for message in plan.messages)


@pytest.mark.parametrize("runtime", ["onnxruntime", "onnxruntime-gpu", "onnxruntime-directml"])
def test_an_installed_onnxruntime_of_any_kind_is_kept(runtime: str) -> None:
    plan = plan_install({**A1111_VENV, "peft": "0.13.2", runtime: "1.16.3"}, cuda=never_asked)
    assert plan.to_install == ()
    assert f"{runtime} 1.16.3 is installed" in plan.messages


def test_another_peft_version_is_never_replaced() -> None:
    plan = plan_install({**A1111_VENV, "peft": "0.10.0", "onnxruntime": "1.20.1"}, cuda=never_asked)
    assert plan.to_install == ()
    assert "left as it is" in plan.messages[0]


def test_constraints_hold_every_installed_version_except_what_is_installed() -> None:
    text = constraints_text({**A1111_VENV, "onnxruntime": "1.0"}, exclude=["onnxruntime"])
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert sorted(lines) == sorted(f"{name}=={version}" for name, version in A1111_VENV.items())


def test_install_missing_passes_the_installed_versions_as_constraints(tmp_path: Path, capsys) -> None:
    runner = RecordingRunner()
    plan = install_missing(A1111_VENV, runner, cuda=lambda: False, temp_dir=tmp_path)
    assert plan.to_install == (PEFT_REQUIREMENT, "onnxruntime")
    [arguments] = runner.calls
    assert arguments[:3] == ["install", PEFT_REQUIREMENT, "onnxruntime"]
    assert arguments[3] == "--constraint"
    assert "protobuf==3.20.0" in runner.constraints[0].splitlines()
    assert "torch==2.1.2+cu121" in runner.constraints[0].splitlines()
    assert "transformers==4.30.2" in runner.constraints[0].splitlines()
    assert list(tmp_path.iterdir()) == [], "the constraints file is removed afterwards"
    printed = capsys.readouterr().out
    assert "peft is missing" in printed and "nothing already installed is upgraded" in printed


def test_nothing_is_run_when_nothing_is_missing(capsys) -> None:
    runner = RecordingRunner()
    install_missing({**A1111_VENV, "peft": "0.13.2", "onnxruntime-gpu": "1.17.1"}, runner, cuda=never_asked)
    assert runner.calls == []
    assert "nothing to install" in capsys.readouterr().out


def test_a_failing_pip_is_reported_and_leaves_no_constraints_file(tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError):
        install_missing(A1111_VENV, RecordingRunner(fail=True), cuda=lambda: False, temp_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_report_says_what_changed() -> None:
    plan = plan_install(A1111_VENV, cuda=lambda: False)
    after = {**A1111_VENV, "peft": "0.13.2", "onnxruntime": "1.26.0"}
    lines = report_result(A1111_VENV, after, plan)
    assert any("peft 0.13.2 installed" in line for line in lines)
    assert lines[-1].endswith("no installed package was changed")
    upgraded = {**after, "protobuf": "5.29.0"}
    assert "protobuf 3.20.0 -> 5.29.0" in report_result(A1111_VENV, upgraded, plan)[-1]


def test_launch_run_pip_is_used_inside_a1111(tmp_path: Path, monkeypatch) -> None:
    assert launch_pip_runner() is None, "outside A1111 there is no launch module"
    record = tmp_path / "command.txt"
    (tmp_path / "launch.py").write_text(
        "def run_pip(command, desc=None):\n"
        f"    open({str(record)!r}, 'w', encoding='utf-8').write(command + '\\n' + desc)\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "launch", raising=False)
    runner = launch_pip_runner()
    assert runner is not None
    arguments = pip_arguments(["onnxruntime"], tmp_path / "dir with spaces" / "c.txt")
    runner(arguments, "onnxruntime for Character LoRA Trainer")
    command, description = record.read_text(encoding="utf-8").split("\n")
    assert shlex.split(command) == arguments
    assert description == "onnxruntime for Character LoRA Trainer"


def build_wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    dist_info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{name}/__init__.py", "")
        archive.writestr(f"{dist_info}/METADATA", metadata)
        archive.writestr(f"{dist_info}/WHEEL", wheel)
        archive.writestr(f"{dist_info}/RECORD", "")


def resolve_with_pip(arguments: list[str], wheels: Path, report: Path) -> dict[str, str]:
    """What pip would install for ``arguments``, offline, without installing anything."""
    command = [sys.executable, "-m", "pip", *arguments, "--dry-run", "--ignore-installed", "--no-index"]
    command += [
        "--find-links",
        str(wheels),
        "--report",
        str(report),
        "--quiet",
        "--disable-pip-version-check",
    ]
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    installs = json.loads(report.read_text(encoding="utf-8"))["install"]
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in installs}


def test_real_pip_keeps_protobuf_and_picks_an_older_onnxruntime(tmp_path: Path) -> None:
    """The case seen in a real A1111 venv, replayed with pip on local wheels."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, "protobuf", "3.20.0", [])
    build_wheel(wheels, "protobuf", "4.25.8", [])
    build_wheel(wheels, "onnxruntime", "1.26.0", ["protobuf"])
    build_wheel(wheels, "onnxruntime", "1.31.1", ["protobuf>=4.25.8"])
    installed = {"protobuf": "3.20.0"}

    plain = resolve_with_pip(["install", "onnxruntime"], wheels, tmp_path / "plain.json")
    assert plain == {"onnxruntime": "1.31.1", "protobuf": "4.25.8"}, "without constraints protobuf moves"

    constraints = tmp_path / "constraints.txt"
    constraints.write_text(constraints_text(installed, exclude=["onnxruntime"]), encoding="utf-8")
    plan = plan_install({**installed, "peft": "0.13.2"}, cuda=lambda: False)
    constrained = resolve_with_pip(pip_arguments(plan.to_install, constraints), wheels, tmp_path / "c.json")
    assert constrained == {"onnxruntime": "1.26.0", "protobuf": "3.20.0"}


def test_install_py_runs_standalone_and_reports_its_decisions() -> None:
    """In the test venv peft and onnxruntime are present, so install.py installs nothing."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "install.py")], cwd="/", env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    installed = install_support.installed_distributions()
    assert f"peft {installed['peft']}" in result.stdout
    assert "nothing to install" in result.stdout
