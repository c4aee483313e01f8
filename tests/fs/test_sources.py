"""SourceRoot: which entries are clients, and that everything else is reported once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vfsroot.sources import SourceRoot


def test_clients_are_exact_names_and_the_rest_is_reported_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("default", "10.0.0.5", "10.0.0.05", "fe80::5", "FE80::6", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "10.0.0.7.nbd").write_text("{}")
    (tmp_path / "10.0.0.8.NBD").write_text("{}")
    (tmp_path / "10.0.0.9").write_text("a file, not a client directory")
    caplog.set_level(logging.WARNING, logger="vfsroot.sources")
    source = SourceRoot(tmp_path)
    assert source.clients() == ["10.0.0.5", "10.0.0.7", "fe80::5"]
    warned = sorted(r.args[2] for r in caplog.records)  # type: ignore[index]
    assert warned == ["10.0.0.05", "10.0.0.8.NBD", "10.0.0.9", "FE80::6", "notes"]
    (file_warning,) = [r.getMessage() for r in caplog.records if r.args[2] == "10.0.0.9"]  # type: ignore[index]
    assert "must be a directory" in file_warning
    caplog.clear()
    source.clients()
    assert caplog.records == []  # once per entry, not once per listing
