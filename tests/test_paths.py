import logging
import os
from pathlib import Path

import pytest

from lib_lora_trainer.config import output_name_problem
from lib_lora_trainer.paths import (
    PathNotAllowedError,
    PathPolicy,
    confine,
    is_inside,
    safe_relative_subfolder,
    suggest_output_name,
)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    (tmp_path / "data" / "images" / "alice").mkdir(parents=True)
    (tmp_path / "data" / "images_private").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    return tmp_path / "data"


def test_a_folder_inside_a_root_is_accepted_as_its_real_path(data: Path) -> None:
    result = confine(data / "images" / "alice", [data / "images"])
    assert result == (data / "images" / "alice").resolve()


def test_the_root_itself_is_accepted(data: Path) -> None:
    assert confine(str(data / "images"), [data / "images"]) == (data / "images").resolve()


def test_a_sibling_sharing_the_prefix_is_refused(data: Path) -> None:
    assert str(data / "images_private").startswith(str(data / "images"))
    with pytest.raises(PathNotAllowedError) as error:
        confine(data / "images_private", [data / "images"])
    assert str(data / "images") in str(error.value)


def test_parent_references_are_refused_even_when_they_land_inside(data: Path) -> None:
    inside_anyway = f"{data}/images/alice/../alice"
    with pytest.raises(PathNotAllowedError, match=r"'\.\.'"):
        confine(inside_anyway, [data / "images"])
    with pytest.raises(PathNotAllowedError):
        confine(f"{data}/images/../../secret", [data / "images"])
    with pytest.raises(PathNotAllowedError):
        confine("..\\secret", [data / "images"])


def test_a_symlink_inside_a_root_pointing_outside_is_refused(data: Path) -> None:
    link = data / "images" / "escape"
    link.symlink_to(data.parent / "secret", target_is_directory=True)
    with pytest.raises(PathNotAllowedError):
        confine(link, [data / "images"])
    with pytest.raises(PathNotAllowedError):
        confine(link / "passwords.txt", [data / "images"])


def test_a_root_given_through_a_symlink_still_contains_its_real_folders(data: Path, tmp_path: Path) -> None:
    linked_root = tmp_path / "linked_images"
    linked_root.symlink_to(data / "images", target_is_directory=True)
    assert confine(data / "images" / "alice", [linked_root]) == (data / "images" / "alice").resolve()
    assert is_inside(linked_root / "alice", data / "images")


def test_several_roots_and_a_file_that_does_not_exist_yet(data: Path) -> None:
    roots = [data / "images", data.parent / "secret"]
    new_file = data.parent / "secret" / "new" / "a.txt"
    assert confine(new_file, roots) == Path(os.path.realpath(new_file))


def test_empty_path_and_missing_roots_are_refused_with_a_clear_message(data: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        with pytest.raises(PathNotAllowedError, match="no folder was given"):
            confine("  ", [data])
        with pytest.raises(PathNotAllowedError, match="no allowed folders"):
            confine(data / "images", [])
    assert "enable-insecure-extension-access" in caplog.text


def test_policy_confines_only_when_asked(data: Path) -> None:
    outside = data.parent / "secret"
    assert PathPolicy.create(False, []).check(outside) == outside
    with pytest.raises(PathNotAllowedError):
        PathPolicy.create(True, [data / "images"]).check(outside)
    assert PathPolicy.create(True, [data, ""]).check(data / "images") == (data / "images").resolve()
    with pytest.raises(PathNotAllowedError):
        PathPolicy.create(False, []).check("")


def test_safe_relative_subfolder() -> None:
    assert safe_relative_subfolder("") == Path()
    assert safe_relative_subfolder("character_trainer") == Path("character_trainer")
    assert safe_relative_subfolder("people\\alice/") == Path("people") / "alice"
    for bad in ("../outside", "a/../../b", "/etc", "C:\\loras"):
        with pytest.raises(PathNotAllowedError):
            safe_relative_subfolder(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Alice Smith (v2)", "Alice_Smith_v2"),
        ("../etc/passwd", "etc_passwd"),
        (".hidden", "hidden"),
        ("a..b", "a.b"),
        ("already_fine-1.5", "already_fine-1.5"),
        ("日本語", "my_character"),
        ("", "my_character"),
    ],
)
def test_suggest_output_name_gives_a_usable_stem(text: str, expected: str) -> None:
    name = suggest_output_name(text)
    assert name == expected
    assert output_name_problem(name) is None
