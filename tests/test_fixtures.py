"""tests/fixtures is a copy of the shared wire-format fixtures and must not drift from them."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import FIXTURES, ROOT

SHARED = ROOT.parent / "shared" / "fixtures"


def test_copied_fixtures_match_the_shared_ones_when_present() -> None:
    if not SHARED.is_dir():
        # A clone without the shared folder beside it tests against its own copy.
        assert any(FIXTURES.rglob("*.sse"))
        return
    shared = {p.relative_to(SHARED): p for p in SHARED.rglob("*") if p.is_file()}
    copied = {p.relative_to(FIXTURES): p for p in FIXTURES.rglob("*") if p.is_file()}
    assert set(shared) <= set(copied)
    for name, path in shared.items():
        assert copied[name].read_bytes() == path.read_bytes(), name


def test_sandbox_transcripts_are_the_fixture_transcripts() -> None:
    transcripts = ROOT / "codex_gateway" / "sandbox" / "transcripts"
    for path in transcripts.iterdir():
        assert (FIXTURES / "upstream" / path.name).read_bytes() == path.read_bytes()
    assert {p.name for p in transcripts.iterdir()} == {
        p.name for p in (FIXTURES / "upstream").iterdir()
    }


def test_fixture_path_is_inside_the_repo() -> None:
    assert Path(FIXTURES).resolve().is_relative_to(ROOT)
