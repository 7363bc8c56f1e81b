"""Which program a watched process is: one that execs another licensed program, or starts
one, is metered as that program; a program's helper processes are part of it, across an
agent restart too.  Fake process table and keeper (tests/unit/test_watcher.py)."""

from __future__ import annotations

import pytest

from metering_protocol.timefmt import parse_rfc3339
from tests.unit.test_watcher import HOUR, T0, UP0, Env, on_disk, restart, upkeep


@pytest.fixture
def env(tmp_path) -> Env:
    return Env(tmp_path)


def checkouts(env: Env) -> list[str]:
    return [c["product"] for c in env.keeper.checkouts]


@pytest.mark.asyncio
async def test_a_watched_program_that_execs_another_licensed_program_is_metered_as_it(env):
    """Found by a review: same pid and start, another product's binary: it ran on under the
    first program's seat and record, and an enforce pool's program ran unseated."""
    env.table.add(100, exe="clock.exe")  # CLOCK.EXE, enforce
    await env.scan()
    env.table.add(100, exe="report-gen", comm="report-gen")  # execve, same pid and start
    await env.scan()
    await env.scan()
    assert checkouts(env) == ["CLOCK.EXE", "REPORT"]
    assert [h.product for h in env.keeper.held.values()] == ["REPORT"]  # CLOCK.EXE's back
    [clock] = env.records(product="CLOCK.EXE")
    [report] = env.records(product="REPORT")
    assert not clock.running and report.running


@pytest.mark.asyncio
async def test_an_exec_into_the_same_product_or_into_none_is_the_program_going_on(env):
    """A launcher exec'ing its real binary (`clock.exe` → `Clock`), then an interpreter
    (`java`): one run, one seat, one record."""
    env.table.add(100, exe="clock.exe")
    await env.scan()
    env.table.add(100, exe="Clock", comm="Clock")
    await env.scan()
    env.table.add(100, exe="java", comm="java")
    await env.scan()
    assert checkouts(env) == ["CLOCK.EXE"] and len(env.records()) == 1
    assert env.records()[0].running


@pytest.mark.asyncio
async def test_a_watched_programs_child_of_another_product_gets_its_own_seat(env):
    """Found by a review: a licensed program started by a watched script joined the
    script's run, whatever its product: no seat and no record of its own."""
    env.table.add(50, exe="dash", comm="report-gen", argv=("/bin/sh", "/opt/r/report-gen"))
    await env.scan()
    env.table.add(60, exe="sed", ppid=50, start=2)  # the script's own helper: part of it
    env.table.add(100, exe="clock.exe", ppid=50, start=2)  # a licensed program it starts
    await env.scan()
    assert checkouts(env) == ["REPORT", "CLOCK.EXE"]
    [report] = env.records(product="REPORT")
    assert sorted(pid for pid, _ in report.pids) == [50, 60]


@pytest.mark.asyncio
async def test_a_programs_helper_process_survives_an_agent_kill9_as_the_same_run(tmp_path):
    """Found by a review: a process joining its parent's run was not written to the open
    record's pids.  After an agent kill -9 with the parent (a wrapper) gone meanwhile, the
    restarted agent closed the run and counted the child as a new one: one program, two
    records, and its time counted twice."""
    env = Env(tmp_path)
    env.table.add(50, exe="dash", comm="clock.exe", argv=("/bin/sh", "/opt/c/clock.exe"))
    env.table.starts[50] = UP0
    await env.scan()
    env.table.add(100, exe="clock", ppid=50, start=2)  # the wrapper's real program
    env.table.starts[100] = UP0 + 0.6
    await env.scan()
    await env.scan(120)
    await upkeep(env)
    # the agent is killed here; meanwhile the wrapper exits, its child goes on
    env.table.exit(50)
    env.table.add(100, exe="clock", ppid=1, start=2)
    env.now += 10
    env.up += 10
    await restart(env, tmp_path)
    await env.scan()
    await env.scan(300)
    env.table.exit(100)
    await env.scan()
    [record] = on_disk(tmp_path)
    assert not record.running and len(env.keeper.checkouts) == 1


@pytest.mark.asyncio
async def test_a_run_of_an_earlier_boot_is_not_continued_by_a_pid_and_start_lookalike(
    tmp_path,
):
    """Found by a review: after a reboot, a new process with the pid and start tick of a
    run left open was taken for it, and the run billed across the whole downtime."""
    env = Env(tmp_path)
    env.table.add(100, start=7)
    await env.scan()
    await env.scan(400)
    await upkeep(env)
    env.keeper.held.clear()
    env.boot_id, env.up, env.now = "boot-2", 40.0, T0 + 2 * HOUR  # rebooted, 2 h later
    env.table.add(100, start=7)
    await restart(env, tmp_path)
    await env.scan(60)
    env.table.exit(100)
    await env.scan()
    lengths = sorted(
        parse_rfc3339(r.ended_at) - parse_rfc3339(r.started_at) for r in on_disk(tmp_path)
    )
    assert len(lengths) == 2 and lengths[-1] < 1000, lengths
