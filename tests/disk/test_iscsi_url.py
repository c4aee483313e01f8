"""iscsi:// URLs in `SRC/<ip>.nbd`: parsed into libguestfs' separate values, or a clear error."""

from __future__ import annotations

import pytest

from vfsroot.config import ConfigError, IscsiUrl, parse_config, parse_url


@pytest.mark.parametrize(("url", "server", "export", "canonical"), [
    ("iscsi://10.0.0.5/iqn.2024-01.org.example:client5/1", "tcp:10.0.0.5:3260",
     "iqn.2024-01.org.example:client5/1", "iscsi://10.0.0.5:3260/iqn.2024-01.org.example:client5/1"),
    ("iscsi://[::1]:3261/iqn.2003-01.org.linux-iscsi.host.x8664:sn.abc/0", "tcp:[::1]:3261",
     "iqn.2003-01.org.linux-iscsi.host.x8664:sn.abc/0", None),
    ("iscsi://san.example.org/eui.02004567a425678d/12", "tcp:san.example.org:3260",
     "eui.02004567a425678d/12", None),
])
def test_iscsi_urls(url: str, server: str, export: str, canonical: str | None) -> None:
    u = parse_url(url)
    assert isinstance(u, IscsiUrl) and u.protocol == "iscsi"
    assert (u.server, u.export) == (server, export)
    if canonical:
        assert str(u) == canonical
    assert parse_url(str(u)) == u


@pytest.mark.parametrize(("url", "why"), [
    ("iscsi://10.0.0.5/notaniqn/1", "not an iSCSI name"),
    ("iscsi://10.0.0.5/iqn.2024-01.org.example:c5", "not an iSCSI name"),  # no LUN
    ("iscsi://10.0.0.5/iqn.2024-01.org.example:c5/x", "LUN"),
    ("iscsi://10.0.0.5/iqn.2024-01.org.example:c5/99999", "LUN"),
    ("iscsi://10.0.0.5/iqn.2024-01.org,example:c5/1", "not an iSCSI name"),
    ("iscsi://10.0.0.5/IQN.2024-01.ORG.EXAMPLE/1", "not an iSCSI name"),
    ("iscsi:///iqn.2024-01.org.example:c5/1", "needs a host"),
    ("iscsi://10.0.0.5/iqn.2024-01.org.example:c5/1?user=x", "no query"),
    # `$` would accept the name followed by a newline: the pattern must match it whole
    ("iscsi://10.0.0.5/iqn.2024-01.org.example:c5%0A/1", "not an iSCSI name"),
    ("iscsi://u:secret@10.0.0.5/iqn.2024-01.org.example:c5/1", "passwords"),
])
def test_bad_iscsi_urls(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_url(url, "SRC/10.0.0.5.nbd")


def test_iscsi_config() -> None:
    cfg = parse_config('{"url": "iscsi://127.0.0.1:3261/iqn.2024-01.org.example:c5/1", '
                       '"mounts": [{"partition": 2, "mountpoint": "/"}], "tftp_root": "/boot"}')
    assert cfg.url == IscsiUrl("127.0.0.1", "iqn.2024-01.org.example:c5", 1, 3261)
