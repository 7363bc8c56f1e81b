from __future__ import annotations

import pytest

from metering_server.seclog import SecurityLog


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lines() -> list[tuple[str, dict]]:
    return []


def make(lines, clock, window_s=60.0, max_keys=10000) -> SecurityLog:
    return SecurityLog(lambda e, f: lines.append((e, f)), window_s, clock, max_keys)


def test_a_storm_gives_one_full_line_and_one_summary(lines, clock):
    log = make(lines, clock)
    for i in range(1000):
        clock.t = 1000.0 + i * 0.05  # 50 s, all inside the 60 s window
        log.event("auth_failed", principal="alice", source="10.0.0.7", reason="bad_token")
    assert lines == [
        ("auth_failed", {"principal": "alice", "source": "10.0.0.7", "reason": "bad_token"})
    ]
    log.flush(1059.9)
    assert len(lines) == 1  # window not over yet
    log.flush(1060.0)
    assert lines[1] == (
        "auth_failed_summary",
        {"principal": "alice", "source": "10.0.0.7", "suppressed": 999, "window_s": 60.0},
    )
    assert len(lines) == 2
    assert len(log) == 0  # idle key dropped


def test_no_summary_when_nothing_was_suppressed(lines, clock):
    log = make(lines, clock)
    log.event("auth_failed", principal="alice", source="a")
    log.flush(clock.t + 60)
    assert [e for e, _ in lines] == ["auth_failed"]
    assert len(log) == 0


def test_summary_comes_at_the_next_event_after_the_window(lines, clock):
    log = make(lines, clock)
    log.event("auth_failed", principal="alice", source="a")
    log.event("auth_failed", principal="alice", source="a")
    clock.t += 61
    log.event("auth_failed", principal="alice", source="a")
    assert [e for e, _ in lines] == ["auth_failed", "auth_failed_summary", "auth_failed"]
    assert lines[1][1]["suppressed"] == 1


def test_keys_are_independent(lines, clock):
    log = make(lines, clock)
    for _ in range(5):
        log.event("auth_failed", principal="alice", source="a")
        log.event("auth_failed", principal="alice", source="b")
        log.event("auth_failed", principal="bob", source="a")
        log.event("locked_out", principal="alice", source="a")
    assert len(lines) == 4
    log.flush(clock.t + 60)
    summaries = {(e, f["principal"], f["source"]): f["suppressed"] for e, f in lines[4:]}
    assert summaries == {
        ("auth_failed_summary", "alice", "a"): 4,
        ("auth_failed_summary", "alice", "b"): 4,
        ("auth_failed_summary", "bob", "a"): 4,
        ("locked_out_summary", "alice", "a"): 4,
    }


def test_flush_only_ends_windows_that_are_over(lines, clock):
    log = make(lines, clock)
    log.event("auth_failed", principal="old")
    log.event("auth_failed", principal="old")
    clock.t += 30
    log.event("auth_failed", principal="new")
    log.event("auth_failed", principal="new")
    log.flush(clock.t + 30)  # old's window is over, new's is not
    assert [(e, f["principal"]) for e, f in lines[2:]] == [("auth_failed_summary", "old")]
    assert len(log) == 1
    log.flush(clock.t + 60)
    assert [(e, f["principal"]) for e, f in lines[3:]] == [("auth_failed_summary", "new")]


def test_flush_defaults_to_the_clock_and_final_emits_everything(lines, clock):
    log = make(lines, clock)
    log.event("auth_failed", principal="a")
    log.event("auth_failed", principal="a")
    log.flush()
    assert len(lines) == 1
    log.flush(final=True)
    assert lines[-1][0] == "auth_failed_summary"
    assert len(log) == 0


def test_memory_is_bounded_by_an_overflow_key(lines, clock):
    log = make(lines, clock, max_keys=10)
    for i in range(1000):
        log.event("auth_failed", principal=f"user{i}", source="10.0.0.9")
    # 10 tracked keys + one overflow key; 10 + 1 full lines, not 1000.
    assert len(log) == 11
    assert len(lines) == 11
    assert lines[10] == ("auth_failed", {"principal": "user10", "source": "10.0.0.9"})
    log.flush(clock.t + 60)
    assert lines[-1] == (
        "auth_failed_summary",
        {"principal": "*", "source": "*", "suppressed": 989, "window_s": 60.0},
    )
    assert len(log) == 0
    # Room again once the windows are over.
    log.event("auth_failed", principal="user999", source="10.0.0.9")
    assert lines[-1][1]["principal"] == "user999"


def test_overflow_is_per_event_name(lines, clock):
    log = make(lines, clock, max_keys=1)
    log.event("auth_failed", principal="a")
    log.event("auth_failed", principal="b")
    log.event("locked_out", principal="c")
    log.event("locked_out", principal="d")
    assert [(e, f["principal"]) for e, f in lines] == [
        ("auth_failed", "a"),
        ("auth_failed", "b"),
        ("locked_out", "c"),
    ]


def test_secret_looking_fields_are_redacted(lines, clock):
    log = make(lines, clock)
    log.event("auth_failed", principal="a", token="hunter2")
    assert lines == [("auth_failed", {"principal": "a", "token": "<redacted>"})]


def test_unhashable_key_fields_do_not_break_logging(lines, clock):
    log = make(lines, clock)
    log.event("auth_failed", principal="a", source=["10.0.0.1", 5000])
    log.event("auth_failed", principal="a", source=["10.0.0.1", 5000])
    assert len(lines) == 1


@pytest.mark.parametrize(("window_s", "max_keys"), [(0, 10), (60, 0)])
def test_bad_settings(window_s, max_keys):
    with pytest.raises(ValueError):
        SecurityLog(lambda e, f: None, window_s, lambda: 0.0, max_keys)


def test_window_can_change_on_reload(lines, clock):
    log = make(lines, clock, window_s=60)
    log.event("auth_failed", principal="a")
    log.event("auth_failed", principal="a")
    log.window_s = 10
    clock.t += 10
    log.event("auth_failed", principal="a")
    assert [e for e, _ in lines] == ["auth_failed", "auth_failed_summary", "auth_failed"]
    assert lines[1][1]["window_s"] == 10
    with pytest.raises(ValueError):
        log.window_s = 0
