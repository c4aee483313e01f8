"""docs/recipes.md stays what the tests run: the tests it names exist, and the text an operator
copies (the tftpd-hpa map, the U-Boot commands, the DHCP and TFTP flags) is the tests' own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from .harness import SERVER_IP, dnsmasq_argv
from .test_pairing import HPA_MAP

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
RECIPES = (HERE.parents[1] / "docs" / "recipes.md").read_text()


def _indented_blocks() -> str:
    """Every indented (code) line of the doc, unindented, one per line."""
    return "\n".join(line[4:] for line in RECIPES.splitlines() if line.startswith("    "))


def test_named_tests_exist() -> None:
    named = set(re.findall(r"`(test_\w+)`", RECIPES))
    defined = set()
    for f in HERE.glob("test_*.py"):
        defined |= {n.name for n in ast.walk(ast.parse(f.read_text()))
                    if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    assert named, "the recipes name no tests"
    assert named <= defined, f"named in docs/recipes.md but not a test: {named - defined}"


def test_tftpd_hpa_map_is_the_tested_one() -> None:
    assert HPA_MAP.strip() in _indented_blocks()


def test_uboot_commands_are_the_typed_ones() -> None:
    source = (HERE / "test_boot.py").read_text()
    code = _indented_blocks()
    for cmd in ("setenv autoload no", "dhcp", "setenv pxefile_addr_r 0x7000000", "pxe get",
                "setenv tftpwindowsize 8"):
        assert f'"{cmd}"' in source, f"the test no longer types {cmd!r}"
        assert cmd in code, f"the U-Boot recipe lacks {cmd!r}"
    for cmd in ("crc32 ${pxefile_addr_r} ${filesize}", "tftpboot ${kernel_addr_r} vmlinuz",
                "tftpboot ${ramdisk_addr_r} initrd.img",
                "zboot ${kernel_addr_r} 0 ${ramdisk_addr_r}"):
        assert cmd in code, f"the U-Boot recipe lacks {cmd!r}"


def test_dhcp_flags_are_the_tested_ones(tmp_path: Path) -> None:
    code = _indented_blocks()
    for arg in dnsmasq_argv(tmp_path, {"52:54:00:e2:e0:01": "10.77.0.100"}):
        if "leasefile" in arg or "pid-file" in arg:
            continue  # paths: the recipe uses system ones
        assert arg in code, f"dnsmasq {arg} is not in the DHCP recipe"
    assert f"--dhcp-boot=pxelinux.0,,{SERVER_IP}" in code


def test_pairing_flags_are_the_tested_ones() -> None:
    code = _indented_blocks()
    source = (HERE / "test_pairing.py").read_text()
    for flag in ("--enable-tftp", "--tftp-unique-root", "--port=0", "--secure", "--map-file"):
        assert flag in code and flag in source, flag
