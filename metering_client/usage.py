"""A usage record: one run of a licensed program, as the spool keeps it and the server takes it.

One record per run (a watched program from its start to its exit, or a seat taken through
the agent's local API from checkout to checkin), however many failovers, outages and
reclaims happen while it runs.  The wire fields are those of the protocol's `usage` op;
the rest is the agent's own bookkeeping and never leaves the workstation.

A run's length is measured on CLOCK_BOOTTIME, not the wall clock: NTP stepping a wrong clock
by five hours during a 600 s run must not bill 18,600 s (or, stepped back, 0 s).  The record
keeps the boot it started in and the boottime at its start; every time the open run is seen
or ended it is placed on the wall clock at that latest reading (`ended_at` = wall now,
`started_at` = wall now - its length).  Until it ends it is never uploaded, so moving its
`started_at` is safe; a closed record is never placed again.  Records without those fields
(written by an older agent, or in a boot whose id could not be read) and runs seen from
another boot keep the wall-clock rule: there their boottime means nothing.

Pure: no I/O, no clock (callers pass the readings: wall-clock epoch seconds, `BootTime`).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from metering_protocol.names import NAME_MAX
from metering_protocol.timefmt import parse_rfc3339, rfc3339

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=NAME_MAX)]
Outcome = Literal["granted", "denied", "overuse"]
OUTCOMES: tuple[str, ...] = ("granted", "denied", "overuse")
WIRE_FIELDS = (
    "record_id",
    "product",
    "version",
    "user",
    "client",
    "started_at",
    "ended_at",
    "outcome",
)


def read_boottime() -> float:
    """CLOCK_BOOTTIME: monotonic, counts through suspend, one count for every process of a
    boot (an agent restarted goes on measuring the runs it left open)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
MACHINE_ID_PATHS = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def read_machine_id(paths: tuple[str, ...] = MACHINE_ID_PATHS) -> str | None:
    """This machine's id (systemd's machine-id): what tells a workstation cloned from an
    image, with its state dir copied, from the machine that wrote that state, where the host
    name and the client name do not.  None when it cannot be read (nothing is then judged
    by it)."""
    for path in paths:
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        if text:
            return text
    return None


def read_boot_id() -> str | None:
    """This boot's id: a boottime reading means something only within its boot.  None when
    it cannot be read (runs are then measured on the wall clock)."""
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip() or None
    except (OSError, ValueError):
        return None


def of_another_machine(
    written: tuple[str | None, str | None], here: tuple[str | None, str | None]
) -> bool:
    """Whether state written on (machine id, boot id) `written` is another machine's than
    `here`'s: a state dir copied with a disk image.  Only ids that can be read judge, and
    what this boot wrote is this machine's whatever its id says now (an administrator gave
    it a new one: found by a review, which had it drop its own seats and runs)."""
    (machine, boot), (our_machine, our_boot) = written, here
    if None in (machine, our_machine) or machine == our_machine:
        return False
    return our_boot is None or boot != our_boot


def host_digest(machine_id: str | None, boot_id: str | None) -> str | None:
    """What hello's `host` says of this machine and boot: a digest, not the ids themselves
    (a machine id is meant to stay on its machine).  None when neither can be read."""
    if machine_id is None and boot_id is None:
        return None
    return hashlib.sha256(f"{machine_id}\0{boot_id}".encode()).hexdigest()[:16]


class BootTime(NamedTuple):
    """A reading of CLOCK_BOOTTIME with the boot it counts from: two readings of one boot
    give a length no wall-clock step changes (suspend included); readings of different
    boots give nothing."""

    boot_id: str | None  # /proc/sys/kernel/random/boot_id; None when it cannot be read
    seconds: float  # CLOCK_BOOTTIME: seconds since that boot


class UsageRecord(msgspec.Struct, kw_only=True):
    record_id: Name  # made by the client (uuid4 hex); also the spool file's name
    product: Name
    version: Name
    user: Name  # the end user
    client: Name  # the agent's client name
    started_at: str  # RFC 3339 UTC
    ended_at: str  # RFC 3339 UTC; while `running`: the last time the run was known to go on
    outcome: Outcome
    # --- local bookkeeping, not sent -----------------------------------------------------
    running: bool = False  # an open run: not uploaded until it ends
    source: Literal["watch", "api"] = "api"  # the process watcher, or the local API
    handle: str | None = None  # the keeper's seat handle (stable across reclaims)
    pids: list[tuple[int, int | None]] = []  # watched processes: (pid, start ticks)
    # Optional, so that spool files of older agents still load (and an older agent reading
    # ours ignores them: msgspec skips unknown fields).  None: measured on the wall clock.
    boot_id: str | None = None  # the boot the run started in
    started_since_boot: float | None = None  # CLOCK_BOOTTIME at the run's start, seconds
    machine_id: str | None = None  # the machine whose spool wrote it (`read_machine_id`)

    def to_wire(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in WIRE_FIELDS}

    def length_at(self, boot: BootTime | None) -> float | None:
        """How long the run has gone on at `boot`, by CLOCK_BOOTTIME; None when the record
        cannot tell (no boot fields, or `boot` is of another boot)."""
        if (
            boot is None
            or self.boot_id is None
            or self.started_since_boot is None
            or boot.boot_id != self.boot_id
        ):
            return None
        return max(0.0, boot.seconds - self.started_since_boot)

    def seen(self, at: float, boot: BootTime | None = None) -> None:
        """The open run was still going at wall time `at` (CLOCK_BOOTTIME `boot`, read
        together).  Measured by boottime where the record can be: placed to end at `at`,
        its length unchanged by any wall-clock step.  Else by the wall clock, never before it
        started (a wall clock stepped back would otherwise make a record every server
        refuses).  A closed record is never changed again: it may be on its way to a server."""
        if not self.running:
            return
        length = self.length_at(boot)
        if length is None:
            self.ended_at = rfc3339(max(at, parse_rfc3339(self.started_at)))
        else:
            self.started_at = rfc3339(at - length)
            self.ended_at = rfc3339(at)

    def end(self, at: float, boot: BootTime | None = None) -> None:
        """Close the run at `at` (see `seen`); it is never placed again."""
        self.seen(at, boot)
        self.running = False

    def end_lapsed(self, at: float, boot: BootTime, lapsed: float | None) -> None:
        """Close the run at `at` (`boot` read with it), or when its seat ran out if that was
        earlier (`lapsed`: CLOCK_BOOTTIME of this boot; a seat lost after a sleep or an
        outage, since another's), never before the run's start."""
        length = self.length_at(boot)
        if lapsed is not None and length is not None:
            lapsed = max(lapsed, boot.seconds - length)  # a lapse judged from a checkout's ask
        if lapsed is not None and lapsed < boot.seconds:
            self.end(at - (boot.seconds - lapsed), BootTime(boot.boot_id, lapsed))
        else:
            self.end(at, boot)

    def end_at_last_seen(self) -> None:
        """Close a run found open after a restart (or a reboot) at the last time it was
        known to go on, placed as it was then: the agent's downtime is not its length
        (records written before `seen` clamped it included)."""
        self.end(parse_rfc3339(self.ended_at))


def new_record_id() -> str:
    return uuid.uuid4().hex


def new_record(
    *,
    product: str,
    version: str,
    user: str,
    client: str,
    started: float,
    outcome: str,
    running: bool,
    source: str,
    handle: str | None = None,
    pids: list[tuple[int, int | None]] | None = None,
    ended: float | None = None,
    started_boot: BootTime | None = None,
) -> UsageRecord:
    """`started_boot`: CLOCK_BOOTTIME at `started`, to measure the run by (see the module
    docstring); without it, or without a boot id, the run is measured on the wall clock."""
    boot_id: str | None = None
    started_since_boot: float | None = None
    if started_boot is not None and started_boot.boot_id is not None:
        boot_id, started_since_boot = started_boot
    return UsageRecord(
        record_id=new_record_id(),
        product=product,
        version=version,
        user=user,
        client=client,
        started_at=rfc3339(started),
        ended_at=rfc3339(started if ended is None else max(ended, started)),
        outcome=outcome,  # type: ignore[arg-type]
        running=running,
        source=source,  # type: ignore[arg-type]
        handle=handle,
        pids=list(pids or ()),
        boot_id=boot_id,
        started_since_boot=started_since_boot,
    )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(UsageRecord)


def encode(record: UsageRecord) -> bytes:
    return _encoder.encode(record)


def wire_size(record: UsageRecord) -> int:
    """Bytes the record takes in a `usage` request (plus a comma)."""
    return len(_encoder.encode(record.to_wire())) + 1


class BadRecord(ValueError):
    pass


def decode(data: bytes, *, name: str | None = None) -> UsageRecord:
    """A record from a spool file; BadRecord names what is wrong (invalid JSON, a missing
    or mistyped field, a time that is not RFC 3339, a file name that is not its id)."""
    try:
        record = _decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise BadRecord(str(exc)) from None
    for field in ("started_at", "ended_at"):
        try:
            parse_rfc3339(getattr(record, field))
        except ValueError as exc:
            raise BadRecord(f"`{field}`: {exc}") from None
    if name is not None and name != record.record_id:
        raise BadRecord(f"file name {name!r} is not the record's id {record.record_id!r}")
    return record
