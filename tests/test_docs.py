"""Docs stay true to the code: every flag documented, every module named, README commands
exactly the ones CI runs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from tftpd.cli import build_parser as tftpd_parser
from vfsroot.cli import build_parser as vfsroot_parser

REPO = Path(__file__).resolve().parent.parent
CONFIG_DOC = (REPO / "docs/configuration.md").read_text()


def _options(parser: argparse.ArgumentParser) -> set[str]:
    found: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
            continue
        found |= {o for o in action.option_strings if o not in ("-h", "--help")}
    return found


@pytest.mark.parametrize("parser", [vfsroot_parser, tftpd_parser], ids=["vfsroot", "tftpd"])
def test_every_flag_is_in_the_configuration_reference(parser) -> None:
    options = _options(parser())
    assert len(options) > 5
    missing = sorted(o for o in options if f"`{o}`" not in CONFIG_DOC)
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_every_module_is_in_the_architecture_doc() -> None:
    doc = (REPO / "docs/architecture.md").read_text()
    modules = [p.relative_to(REPO).as_posix() for pkg in ("vfsroot", "tftpd")
               for p in (REPO / pkg).rglob("*.py") if p.name != "__init__.py"]
    assert len(modules) > 10
    missing = sorted(m for m in modules if m not in doc and Path(m).name not in doc)
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^    (bash scripts/run\.sh \w+)$", readme, flags=re.M)
    assert commands == ["bash scripts/run.sh demo", "bash scripts/run.sh test"]
    ci = (REPO / ".ci/run").read_text()
    assert "bash scripts/run.sh test" in ci
