"""What ``install.py`` installs into A1111's Python, and how, without disturbing A1111's own pins.

Only missing packages are installed: ``peft`` at the version known to import under A1111 v1.10.1's
``transformers==4.30.2`` / ``accelerate==0.21.0``, and ``onnxruntime`` (``onnxruntime-gpu`` when torch
has CUDA) for the WD14 tagger. An installed package is never upgraded or replaced: every distribution
already installed is passed to pip as a constraint at its current version. Without that, a plain
``pip install onnxruntime`` picks the newest release, which requires a newer protobuf and so replaces
A1111's ``protobuf==3.20.0``; constrained, pip picks the newest onnxruntime that fits what is there.

This module is plain Python (no torch, no A1111 imports at import time) so the decisions can be tested.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PEFT_REQUIREMENT = "peft==0.13.2"
ONNXRUNTIME_CPU = "onnxruntime"
ONNXRUNTIME_GPU = "onnxruntime-gpu"
# Any of these provides the `onnxruntime` module; one is enough and must not be joined by another.
ONNXRUNTIME_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-silicon",
    "ort-nightly",
    "ort-nightly-gpu",
)
LOG_PREFIX = "[Character LoRA Trainer]"

# A name pip accepts in a requirement line (PEP 508) and a plain PEP 440 version (local part allowed).
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_VERSION = re.compile(
    r"^v?(\d+!)?\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[A-Za-z0-9]+(\.[A-Za-z0-9]+)*)?$",
    re.IGNORECASE,
)

PipRunner = Callable[[list[str], str], None]


def canonical_name(name: str) -> str:
    """PEP 503 normalised distribution name (``Pillow`` -> ``pillow``, ``open_clip`` -> ``open-clip``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions(paths: Sequence[str] | None = None) -> dict[str, str]:
    """``{canonical name: version}`` of what is installed (on ``paths``, default ``sys.path``).

    The first one found wins, as for imports. Names or versions pip could not read back are skipped.
    """
    found: dict[str, str] = {}
    if paths is None:
        distributions = importlib.metadata.distributions()
    else:
        distributions = importlib.metadata.distributions(path=list(paths))
    for distribution in distributions:
        name = distribution.metadata["Name"] if distribution.metadata else None
        version = distribution.version
        if not name or not version or not _NAME.match(name) or not _VERSION.match(version):
            continue
        found.setdefault(canonical_name(name), version)
    return found


def torch_has_cuda() -> bool:
    """True when the installed torch was built with CUDA and sees a GPU; False when torch is absent."""
    try:
        import torch
    except Exception:
        return False
    return bool(getattr(torch.version, "cuda", None)) and torch.cuda.is_available()


@dataclass(frozen=True)
class InstallPlan:
    to_install: tuple[str, ...]  # requirement strings, e.g. "peft==0.13.2"
    messages: tuple[str, ...]  # one line per decision, for the console


def plan_install(installed: Mapping[str, str], cuda: Callable[[], bool] = torch_has_cuda) -> InstallPlan:
    """Decide what is missing. ``cuda`` is only asked when onnxruntime has to be installed."""
    to_install: list[str] = []
    messages: list[str] = []
    peft_version = installed.get("peft")
    if peft_version is None:
        to_install.append(PEFT_REQUIREMENT)
        messages.append(f"peft is missing: installing {PEFT_REQUIREMENT}")
    elif f"peft=={peft_version}" != PEFT_REQUIREMENT:
        messages.append(
            f"peft {peft_version} is installed and left as it is (tested with {PEFT_REQUIREMENT}; if "
            "training fails on import, install that version)"
        )
    else:
        messages.append(f"peft {peft_version} is installed")

    present = [name for name in ONNXRUNTIME_DISTRIBUTIONS if name in installed]
    if present:
        messages.append(f"{present[0]} {installed[present[0]]} is installed")
    else:
        package = ONNXRUNTIME_GPU if cuda() else ONNXRUNTIME_CPU
        to_install.append(package)
        kind = "GPU (torch has CUDA)" if package == ONNXRUNTIME_GPU else "CPU"
        messages.append(f"onnxruntime is missing: installing {package} for the {kind} WD14 tagger")
    return InstallPlan(to_install=tuple(to_install), messages=tuple(messages))


def constraints_text(installed: Mapping[str, str], exclude: Iterable[str] = ()) -> str:
    """A pip constraints file holding every installed distribution at its current version."""
    skipped = {canonical_name(name) for name in exclude}
    lines = [f"{name}=={version}" for name, version in sorted(installed.items()) if name not in skipped]
    header = "# Written by the Character LoRA Trainer's install.py: keep every installed package as it is.\n"
    return header + "\n".join(lines) + "\n"


def pip_arguments(requirements: Sequence[str], constraints_file: str | Path) -> list[str]:
    """The arguments after ``python -m pip``."""
    return ["install", *requirements, "--constraint", str(constraints_file)]


def _requirement_name(requirement: str) -> str:
    return canonical_name(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0])


def subprocess_pip_runner(arguments: list[str], description: str) -> None:
    """Run ``sys.executable -m pip ...`` (used when A1111's ``launch`` module is not importable)."""
    print(f"{LOG_PREFIX} Installing {description}")
    subprocess.run([sys.executable, "-m", "pip", *arguments, "--prefer-binary"], check=True)


def launch_pip_runner() -> PipRunner | None:
    """A runner through A1111's ``launch.run_pip`` (honours --index-url etc.), or None outside A1111."""
    try:
        import launch  # A1111's launch.py, importable because A1111 puts its root on PYTHONPATH
    except Exception:
        return None
    run_pip = getattr(launch, "run_pip", None)
    if run_pip is None:
        return None

    def runner(arguments: list[str], description: str) -> None:
        quote = subprocess.list2cmdline if os.name == "nt" else shlex.join
        run_pip(quote(arguments), description)

    return runner


def install_missing(
    installed: Mapping[str, str],
    runner: PipRunner,
    *,
    cuda: Callable[[], bool] = torch_has_cuda,
    temp_dir: str | Path | None = None,
) -> InstallPlan:
    """Install what :func:`plan_install` finds missing, constrained to the installed versions.

    Prints what it decided and did; raises ``subprocess.CalledProcessError``/``RuntimeError`` from
    the runner when pip fails. The constraints file is removed afterwards.
    """
    plan = plan_install(installed, cuda)
    for message in plan.messages:
        print(f"{LOG_PREFIX} {message}")
    if not plan.to_install:
        print(f"{LOG_PREFIX} nothing to install")
        return plan
    wanted = [_requirement_name(requirement) for requirement in plan.to_install]
    handle, path = tempfile.mkstemp(prefix="lora_trainer_constraints_", suffix=".txt", dir=temp_dir)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(constraints_text(installed, exclude=wanted))
        print(
            f"{LOG_PREFIX} installing {', '.join(plan.to_install)} with the {len(installed)} installed "
            "packages held at their current versions (nothing already installed is upgraded)"
        )
        runner(
            pip_arguments(plan.to_install, path), f"{', '.join(plan.to_install)} for Character LoRA Trainer"
        )
    finally:
        Path(path).unlink(missing_ok=True)
    return plan


def report_result(before: Mapping[str, str], after: Mapping[str, str], plan: InstallPlan) -> list[str]:
    """Lines saying what was installed and confirming nothing else changed."""
    lines = []
    for requirement in plan.to_install:
        name = _requirement_name(requirement)
        lines.append(f"{name} {after[name]} installed" if name in after else f"{name} is still missing")
    changed = sorted(name for name, version in before.items() if after.get(name) != version)
    lines.append(
        "changed packages: " + ", ".join(f"{n} {before[n]} -> {after.get(n, 'removed')}" for n in changed)
        if changed
        else "no installed package was changed"
    )
    return [f"{LOG_PREFIX} {line}" for line in lines]


def main() -> int:
    """Entry point for ``install.py``. Returns the process exit status."""
    before = installed_distributions()
    runner = launch_pip_runner() or subprocess_pip_runner
    try:
        plan = install_missing(before, runner)
    except (subprocess.CalledProcessError, RuntimeError) as error:
        print(
            f"{LOG_PREFIX} pip could not install the missing packages without changing installed ones:\n"
            f"{error}\nThe tab still loads; the WD14 tagger or training reports what is missing.",
            file=sys.stderr,
        )
        return 1
    if plan.to_install:
        importlib.invalidate_caches()
        for line in report_result(before, installed_distributions(), plan):
            print(line)
    return 0
