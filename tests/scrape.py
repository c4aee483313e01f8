"""Scraping a daemon's `/metrics` the way Prometheus does: a real HTTP GET, the answer parsed
by prometheus_client's own parser (so a malformed exposition fails the test), every sample
flattened to ``'name{k=v,...}' -> value`` for easy before/after comparisons."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def samples_of(text: str) -> dict[str, float]:
    """Every sample of an exposition as 'name{k=v,...}' -> value (labels sorted)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def scrape(url: str) -> dict[str, float]:
    """GET /metrics with a real HTTP client: 200, the text format, every sample."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return samples_of(response.read().decode())
