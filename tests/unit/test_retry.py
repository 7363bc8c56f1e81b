from __future__ import annotations

import random

import pytest

from metering_client.retry import RetryPolicy, RetrySettings, attempt_order
from metering_client.serverlist import ServerEntry


def policy(retries=5, base=1000, cap=60000, r=1.0) -> RetryPolicy:
    return RetryPolicy(RetrySettings(retries, base, cap), rand=lambda: r)


def schedule(p: RetryPolicy) -> list[float | None]:
    return [p.pass_delay_s(n) for n in range(1, p.settings.retries + 1)]


def test_full_rand_gives_the_doubling_ceiling_then_gives_up():
    assert schedule(policy(retries=5)) == [1.0, 2.0, 4.0, 8.0, None]


def test_half_rand_halves_every_delay():
    assert schedule(policy(retries=4, r=0.5)) == [0.5, 1.0, 2.0, None]


def test_zero_rand_retries_immediately():
    assert schedule(policy(retries=3, r=0.0)) == [0.0, 0.0, None]


def test_delays_stop_growing_at_the_cap():
    assert schedule(policy(retries=7, base=1000, cap=5000)) == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, None]


def test_cap_below_base_wins():
    assert schedule(policy(retries=3, base=1000, cap=300)) == [0.3, 0.3, None]


def test_gives_up_after_exactly_retries_passes():
    for retries in (1, 2, 5):
        p = policy(retries=retries)
        passes = 1  # the first pass needs no delay
        while p.pass_delay_s(passes) is not None:
            passes += 1
        assert passes == retries
        assert p.pass_delay_s(retries + 3) is None


def test_rand_is_called_once_per_delay_and_scales_linearly():
    draws = iter([0.25, 0.75, 0.1])
    p = RetryPolicy(RetrySettings(4, 1000, 60000), rand=lambda: next(draws))
    assert schedule(p) == [0.25, 1.5, pytest.approx(0.4), None]


def test_passes_done_must_be_positive():
    with pytest.raises(ValueError):
        policy().pass_delay_s(0)


def test_huge_pass_count_stays_capped():
    p = policy(retries=10_000, base=1000, cap=60000)
    assert p.pass_delay_s(9_999) == 60.0


def test_max_total_delay_is_the_sum_of_ceilings():
    assert policy(retries=5, base=1000, cap=60000).max_total_delay_s() == 1 + 2 + 4 + 8
    assert policy(retries=6, base=1000, cap=5000).max_total_delay_s() == 1 + 2 + 4 + 5 + 5
    assert policy(retries=1).max_total_delay_s() == 0


def test_max_total_delay_bounds_any_schedule():
    for r in (0.0, 0.3, 0.999, 1.0):
        p = policy(retries=8, base=700, cap=9000, r=r)
        waited = sum(d for d in schedule(p) if d is not None)
        assert waited <= p.max_total_delay_s() + 1e-9


def test_background_delay_never_below_the_cap():
    assert policy(cap=60000, r=0.0).background_delay_s() == 60.0
    assert policy(cap=60000, r=0.5).background_delay_s() == 67.5
    assert policy(cap=60000, r=1.0).background_delay_s() == 75.0


@pytest.mark.parametrize(
    ("retries", "base", "cap"), [(0, 1000, 60000), (3, -1, 60000), (3, 1000, 0)]
)
def test_settings_reject_values_that_would_storm_or_never_try(retries, base, cap):
    with pytest.raises(ValueError):
        RetrySettings(retries, base, cap)


def entry(n: int, priority: int) -> ServerEntry:
    return ServerEntry(address=f"tcp://10.0.0.{n}:7001", name=f"s{n}", priority=priority)


def test_attempt_order_puts_lower_priority_first_always():
    servers = [entry(1, 2), entry(2, 0), entry(3, 1), entry(4, 0), entry(5, 2)]
    for seed in range(200):
        order = attempt_order(servers, random.Random(seed))
        priorities = [e.priority for e in order]
        assert priorities == sorted(priorities)
        assert sorted(order, key=lambda e: e.name) == sorted(servers, key=lambda e: e.name)


def test_attempt_order_spreads_first_choice_over_equal_priorities():
    tier = [entry(1, 0), entry(2, 0), entry(3, 0)]
    firsts = {attempt_order([*tier, entry(9, 1)], random.Random(seed))[0] for seed in range(100)}
    assert firsts == set(tier)


def test_attempt_order_rotates_rather_than_shuffles():
    tier = [entry(n, 0) for n in range(1, 6)]
    for seed in range(100):
        order = attempt_order(tier, random.Random(seed))
        start = tier.index(order[0])
        assert order == tier[start:] + tier[:start]


def test_attempt_order_is_reproducible_with_a_seed():
    servers = [entry(n, n % 2) for n in range(1, 7)]
    assert attempt_order(servers, random.Random(42)) == attempt_order(servers, random.Random(42))


def test_attempt_order_of_nothing_is_nothing():
    assert attempt_order([], random.Random(0)) == []
