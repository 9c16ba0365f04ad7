"""Settings: the files and folders a serving gateway needs of this machine, checked before
anything starts (`local_problems`, which `config check` and `serve` run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from codex_gateway.config import load_settings, local_problems, read_secret_key_file
from codex_gateway.errors import ConfigError

SECRET = "s" * 40
FILES = ["adir", "afile", "key", "latin-1"]


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding a file `afile`, a folder `adir`, a key file `key` and a file
    `latin-1` that is not UTF-8; paths in the settings are relative to it, as an operator's."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("hunter2")
    (tmp_path / "adir").mkdir()
    (tmp_path / "key").write_text(f"  {SECRET}\n")
    (tmp_path / "latin-1").write_bytes(("\u00e9" * 40).encode("latin-1"))
    return tmp_path


def problems(**environ: str) -> list[str]:
    env = {f"CODEX_GATEWAY_{name.upper()}": value for name, value in environ.items()}
    try:
        load_settings(env, local=True)
    except ConfigError as exc:
        return exc.problems
    return []


def test_the_defaults_need_nothing_and_change_nothing(here: Path) -> None:
    assert problems() == []
    assert sorted(path.name for path in here.iterdir()) == FILES


# settings, the one problem they give
UNUSABLE = [
    # a secret key file that gives no key
    (
        {"secret_key_file": "missing"},
        "setting secret_key_file = 'missing': cannot be read: No such file or directory",
    ),
    (
        {"secret_key_file": "adir"},
        "setting secret_key_file = 'adir': cannot be read: Is a directory",
    ),
    (
        {"secret_key_file": "afile"},
        "setting secret_key_file = 'afile': the key in it must be at least 32 characters long",
    ),
    (
        {"secret_key_file": "latin-1"},
        "setting secret_key_file = 'latin-1': not UTF-8 text (byte 0)",
    ),
    # folders that are files, or under one
    ({"journal_dir": "afile"}, "setting journal_dir = 'afile': afile is not a folder"),
    (
        {"journal_dir": "afile/journals"},
        "setting journal_dir = 'afile/journals': afile/journals cannot be created: afile is "
        "not a folder",
    ),
    (
        {"spool_path": "afile/spool.jsonl"},
        "setting spool_path = 'afile/spool.jsonl': afile is not a folder",
    ),
    (
        {"database_url": "sqlite:///afile/gateway.db"},
        "setting database_url = 'sqlite:///afile/gateway.db': afile is not a folder",
    ),
    # a spool that is a folder
    ({"spool_path": "adir"}, "setting spool_path = 'adir': adir is a folder, not a file"),
]


@pytest.mark.parametrize(("environ", "problem"), UNUSABLE)
def test_an_unusable_file_or_folder_names_its_setting_and_value(
    here: Path, environ: dict[str, str], problem: str
) -> None:
    assert problems(**environ) == [problem]
    assert sorted(path.name for path in here.iterdir()) == FILES


def test_the_journals_beside_the_spool_are_named_as_not_set(here: Path) -> None:
    (here / "adir" / "hold-journal").write_text("not a folder")

    assert problems(spool_path="adir/spool.jsonl") == [
        "setting journal_dir (not set, so beside the spool): adir/hold-journal is not a folder"
    ]


def test_journals_beside_a_broken_spool_do_not_repeat_its_problem(here: Path) -> None:
    assert problems(spool_path="afile/spool.jsonl") == [
        "setting spool_path = 'afile/spool.jsonl': afile is not a folder"
    ]


def test_every_problem_is_reported_at_once_with_those_of_the_values(here: Path) -> None:
    found = problems(
        log_level="LOUD",
        secret_key_file="missing",
        journal_dir="afile",
        spool_path="adir",
        database_url="sqlite:///afile/gateway.db",
    )

    assert [problem.split(" = ")[0] for problem in found] == [
        "setting log_level",
        "setting secret_key_file",
        "setting database_url",
        "setting spool_path",
        "setting journal_dir",
    ]


def test_a_refused_value_is_not_checked_again_as_its_default(here: Path) -> None:
    """The default in place of a refused spool path (`./data/...`) or key is not the
    operator's: nothing is said about it, nor about journals beside that spool."""
    found = problems(spool_path=" ", journal_dir=" ", secret_key="short", secret_key_file="missing")

    assert [problem.split(" = ")[0].split(":")[0] for problem in found] == [
        "setting spool_path",
        "setting journal_dir",
        "setting secret_key",
        # given both ways, a key is refused whatever each is worth
        "settings secret_key (CODEX_GATEWAY_SECRET_KEY) and secret_key_file "
        "(CODEX_GATEWAY_SECRET_KEY_FILE) are both set",
    ]


def test_without_its_config_file_the_machine_is_not_checked(here: Path) -> None:
    """The defaults in place of settings never read are not the operator's."""
    assert problems(config="missing.toml", journal_dir="afile") == [
        "config file missing.toml: No such file or directory"
    ]


def test_an_inline_key_beside_a_key_file_is_refused_and_the_file_is_not_read(
    here: Path,
) -> None:
    """Neither wins: the one not taken may be the key the stored values were sealed with."""
    assert problems(secret_key=SECRET, secret_key_file="missing") == [
        "settings secret_key (CODEX_GATEWAY_SECRET_KEY) and secret_key_file "
        "(CODEX_GATEWAY_SECRET_KEY_FILE) are both set: give the secret key in one of them only"
    ]


def test_a_key_file_and_folders_that_can_be_used_pass(here: Path) -> None:
    environ = {
        "secret_key_file": "key",
        "spool_path": "new/spool.jsonl",
        "journal_dir": "adir/journals",
        "database_url": "sqlite:///new/deeper/gateway.db",
    }

    assert problems(**environ) == []
    assert read_secret_key_file("key") == SECRET
    assert not (here / "new").exists()


def test_a_folder_this_process_may_not_write_in_is_a_problem(
    here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tests run as root, who may write anywhere: here the system says no to one folder."""
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != Path("adir"))

    assert problems(journal_dir="adir", spool_path="adir/sub/spool.jsonl") == [
        "setting spool_path = 'adir/sub/spool.jsonl': adir/sub cannot be created: cannot "
        "write in adir: Permission denied",
        "setting journal_dir = 'adir': cannot write in adir: Permission denied",
    ]


def test_only_a_caller_that_asks_has_the_machine_checked(here: Path) -> None:
    settings = load_settings({"CODEX_GATEWAY_JOURNAL_DIR": "afile"})

    assert local_problems(settings) == ["setting journal_dir = 'afile': afile is not a folder"]


def test_a_key_file_that_gives_no_key_is_one_config_error(here: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        read_secret_key_file("afile")

    assert caught.value.problems == [
        "setting secret_key_file = 'afile': the key in it must be at least 32 characters long"
    ]
    assert "hunter2" not in str(caught.value)  # what the file holds is never shown


def test_a_key_file_longer_than_a_key_file_can_be_is_refused_unread(here: Path) -> None:
    """A long run of key characters would pass for a key: the bound refuses it, and names
    the setting and the limit, never what the file holds."""
    (here / "long").write_text("k" * 4097)

    with pytest.raises(ConfigError) as caught:
        read_secret_key_file("long")

    assert caught.value.problems == [
        "setting secret_key_file = 'long': is longer than 4096 bytes; the file must hold only "
        "the key"
    ]
    assert "kkkk" not in str(caught.value)


def test_a_key_file_of_exactly_the_bound_is_read(here: Path) -> None:
    (here / "full").write_text(SECRET + " " * (4096 - len(SECRET)))

    assert read_secret_key_file("full") == SECRET
