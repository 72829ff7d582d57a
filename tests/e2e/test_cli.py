"""The command line (`python -m app`): every subcommand explains itself with --help, and `demo-data` loads the demo
clinic into a fresh embedded database once."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.__main__ import build_parser, main

COMMANDS = sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)  # type: ignore[arg-type]


def test_the_commands_are_the_documented_ones() -> None:
    assert COMMANDS == ["create-admin", "demo-data", "migrate", "run", "serve", "sfu", "worker"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert f"python -m app {command}" in shown
    assert "-h, --help" in shown


def test_the_demo_clinic_loads_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)  # the embedded profile's SQLite file under DATA_DIR
    assert main(["demo-data"]) == 0
    first = capsys.readouterr().out
    assert "Demo clinic loaded" in first
    assert "+7916" in first  # the phones to sign in with
    assert (tmp_path / "clinic.db").exists()
    assert main(["demo-data"]) == 0
    assert "already loaded" in capsys.readouterr().out
