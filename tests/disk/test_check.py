"""`vfsroot check` without launching (launches are covered by the other disk tests)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from .conftest import needs_guestfs


@needs_guestfs
def test_check_skip_launch_reports_binding_and_kvm() -> None:
    out = subprocess.run([sys.executable, "-m", "vfsroot.cli", "check", "--skip-launch"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "python3-guestfs importable" in out.stdout
    assert "/dev/kvm" in out.stdout


def test_check_without_binding_fails_clearly(tmp_path: pathlib.Path) -> None:
    (tmp_path / "guestfs.py").write_text("raise ImportError('simulated: no binding')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "vfsroot.cli", "check", "--skip-launch"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1
    assert "python3-guestfs is not importable" in out.stdout
