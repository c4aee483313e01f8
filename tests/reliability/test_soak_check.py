"""The soak's flatness rule (soak.py `not_flat`) on made-up samples, no daemons: a climb of the
size the 30-minute run showed before the malloc policy (~1.5 MiB/min) fails it, a flat series
with the dips a storm round's gaps cause passes, and one worker that grows while the other
shrinks is judged by the daemon's sum."""

from __future__ import annotations

import random

from . import procs
from .soak import SoakResult, not_flat, theil_sen, trend, trend_limit

NAME = "vfsroot-tftpd"
#: Per worker; the sum of the two then moves +-1 MiB, twice the spread of the traffic samples
#: of an 8-minute run with the malloc policy (89.2-90.2 MiB, docs/reliability.md).
NOISE_MIB = 0.5


def sample(rss_mib: list[float]) -> procs.Sample:
    each = tuple(int(x * 1024) for x in rss_mib)
    return procs.Sample(len(each), sum(each), sum(each), 20, 8, each)


def series(seconds: float, every: float, climb_per_min: float, seed: int = 1,
           skew_per_min: float = 0.0) -> SoakResult:
    """Two workers around 45 MiB each with +-NOISE_MIB of noise, every 7th sample taken between
    storm rounds (15 MiB lower), the sum climbing ``climb_per_min``; ``skew_per_min`` moves
    memory from one worker to the other."""
    rng = random.Random(seed)
    result = SoakResult()
    at = every
    while at <= seconds:
        minutes = at / 60
        base = 45 + climb_per_min / 2 * minutes
        dip = 15 if int(at / every) % 7 == 3 else 0
        a = base + skew_per_min * minutes + rng.uniform(-NOISE_MIB, NOISE_MIB) - dip / 2
        b = base - skew_per_min * minutes + rng.uniform(-NOISE_MIB, NOISE_MIB) - dip / 2
        result.samples.append((at, {NAME: sample([a, b])}))
        result.idle.append(False)
        result.transfers.append(int(at * 100))
        at += every
    return result


def idle(rss_mib: float) -> dict[str, procs.Sample]:
    return {NAME: sample([rss_mib / 2, rss_mib / 2])}


def test_theil_sen_ignores_outliers() -> None:
    points = [(float(x), 2.0 * x) for x in range(10)]
    points[4] = (4.0, -50.0)
    assert theil_sen(points) == 2.0
    assert theil_sen([(1.0, 5.0)]) == 0.0


def test_limit_is_a_rate_plus_noise_over_the_window() -> None:
    """At least 2 MiB of noise spread over the window; more if the samples are noisier; not
    judged at all over the 2-minute form's 80 s."""
    assert trend_limit(series(120, 5, 0), NAME) == float("inf")
    window = (300 - 100) / 60
    assert abs(trend_limit(series(300, 10, 0), NAME) - (0.5 + 2.0 / window)) < 0.01
    assert abs(trend_limit(series(1800, 10, 0), NAME) - (0.5 + 2.0 / (1200 / 60))) < 0.01
    noisy = series(300, 10, 0)
    for i, (at, _) in enumerate(noisy.samples):  # samples at 60 or 80 MiB by storm phase
        noisy.samples[i] = (at, {NAME: sample([30.0 + 20 * (i % 2), 30.0])})
    assert abs(trend_limit(noisy, NAME) - (0.5 + 20.0 / window)) < 0.01


def test_flat_series_with_dips_passes_every_form() -> None:
    for seconds, every in ((120, 5), (300, 10), (1800, 10)):
        for seed in range(20):
            result = series(seconds, every, 0.0, seed)
            assert not_flat(idle(60), idle(61), result) == [], (seconds, seed)


def test_the_old_climb_fails_the_5_and_30_minute_forms() -> None:
    for seconds in (300, 1800):
        for seed in range(20):
            result = series(seconds, 10, 1.5, seed)
            grew = not_flat(idle(60), idle(61), result)
            assert len(grew) == 1 and "RSS climbs" in grew[0], (seconds, seed, grew)


def test_a_worker_taking_load_from_the_other_is_not_a_climb() -> None:
    result = series(300, 10, 0.0, skew_per_min=2.0)
    total, each = trend(result, NAME)
    assert abs(total) < 0.3 and each[0] > 1.5 and each[1] < -1.5
    assert not_flat(idle(60), idle(60), result) == []


def test_idle_growth_beyond_the_slack_fails() -> None:
    grew = not_flat(idle(60), idle(60 + 20), series(120, 5, 0.0))
    assert len(grew) == 1 and "RSS" in grew[0] and "climbs" not in grew[0]


def with_idle_maps(result: SoakResult, heap_mib: float, arenas_mib: float) -> SoakResult:
    """``result`` ending in an idle sample whose two workers show this heap and arenas."""
    last = result.samples[-1][0] + 12
    result.samples.append((last, idle(60)))
    result.idle.append(True)
    result.transfers.append(result.transfers[-1])
    m = procs.MemoryMap(int(heap_mib * 1024), int(arenas_mib * 1024), 13 * 1024, 12 * 1024)
    result.maps = [{}] * (len(result.samples) - 1) + [{NAME: [m, m]}]
    return result


def test_memory_malloc_keeps_idle_fails_beyond_the_limit() -> None:
    assert not_flat(idle(60), idle(60), with_idle_maps(series(120, 5, 0.0), 5.6, 0.1)) == []
    grew = not_flat(idle(60), idle(60), with_idle_maps(series(120, 5, 0.0), 14.6, 9.5))
    assert len(grew) == 2 and all("heap and arenas" in g for g in grew), grew
