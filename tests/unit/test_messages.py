import pytest

from metering_protocol.errors import BadRequest, MeteringError, UnknownError
from metering_protocol.messages import MAX_ID, Checkout, parse_request, parse_time, request_id
from metering_runtime.exitcodes import EX_USAGE
from metering_server.admin_cli import AdminError, _when


def test_checkout_parses_with_defaults():
    req = parse_request({"id": 7, "op": "checkout", "product": "A", "version": "1"})
    assert isinstance(req, Checkout)
    assert (req.wait_s, req.lease, req.user) == (0.0, None, None)


def test_unknown_fields_are_ignored_for_forward_compatibility():
    req = parse_request({"id": 1, "op": "ping", "trace": "x"})
    assert req.op == "ping"


@pytest.mark.parametrize(
    ("frame", "rid", "needle"),
    [
        ({"op": "ping"}, None, "missing field `id`"),
        ({"id": "1", "op": "ping"}, None, "`id` must be an integer"),
        ({"id": True, "op": "ping"}, None, "`id` must be an integer"),
        ({"id": -1, "op": "ping"}, None, "`id` must be an integer"),
        ({"id": MAX_ID + 1, "op": "ping"}, None, "`id` must be an integer"),
        ({"id": 3, "op": 5}, 3, "`op`"),
        ({"id": 3, "op": "fly"}, 3, "unknown op 'fly'"),
        ({"id": 4, "op": "checkout", "product": "A"}, 4, "missing field `version`"),
        ({"id": 4, "op": "checkout", "product": 1, "version": "1"}, 4, "product:"),
        ({"id": 4, "op": "checkout", "product": "A", "version": "1", "wait_s": -1}, 4, "wait_s"),
        (
            {"id": 4, "op": "checkout", "product": "A", "version": "1", "lease": "x" * 129},
            4,
            "lease",
        ),
        ({"id": 5, "op": "heartbeat", "leases": "L1"}, 5, "leases"),
        ({"id": 5, "op": "heartbeat", "leases": [1]}, 5, "leases[0]"),
        ({"id": 6, "op": "hello", "protocol": "1", "client": "c"}, 6, "protocol"),
    ],
)
def test_bad_requests_name_the_field_and_keep_a_readable_id(frame, rid, needle):
    assert request_id(frame) == rid
    with pytest.raises(BadRequest) as err:
        parse_request(frame)
    assert needle in err.value.message
    assert err.value.to_wire()["retryable"] is False


def test_error_round_trip_keeps_code_fields_and_retryability():
    wire = {
        "code": "denied",
        "message": "full",
        "retryable": True,
        "retry_after_s": None,
        "in_use": 5,
        "seats": 5,
    }
    err = MeteringError.from_wire(wire)
    assert err.code == "denied" and err.retryable and err.fields == {"in_use": 5, "seats": 5}
    assert err.to_wire() == wire


@pytest.mark.parametrize("retryable", [True, False])
def test_an_unknown_error_code_keeps_the_peers_code_and_verdict(retryable):
    """Found by a review: the verdict was dropped (`retryable` False whatever the peer
    said), so the keeper, the watcher and `Seat` gave up where a newer server had said
    "again", and the agent relayed the error to its local clients as `unknown`."""
    wire = {"code": "martian", "message": "?", "retryable": retryable, "retry_after_s": 2.0}
    err = MeteringError.from_wire(wire)
    assert isinstance(err, UnknownError)
    assert err.retryable is retryable and err.wire_code == "martian"
    assert err.to_wire() == wire  # relayed as it came
    assert str(err) == "martian: ?"  # and shown with its own code
    assert UnknownError("made here").retryable is False  # the class keeps its own
    assert MeteringError.from_wire({"code": 7, "message": "?"}).to_wire()["code"] == "unknown"


@pytest.mark.parametrize(
    "field", [{"idempotency_key": "k\n2"}, {"user": "ali\tce"}, {"user": "x\x7f"}]
)
def test_names_with_control_characters_are_refused_with_a_readable_reason(field):
    frame = {"id": 5, "op": "checkout", "product": "A", "version": "1", **field}
    with pytest.raises(BadRequest) as err:
        parse_request(frame)
    (name,) = field
    assert err.value.message == f"{name}: must not contain control characters"


def test_a_usage_records_names_are_checked_and_a_checkouts_product_is_the_catalogues():
    from metering_protocol.messages import parse_usage_record

    record = {
        "record_id": "r1",
        "product": "A\x07",
        "version": "1",
        "user": "u",
        "client": "c",
        "started_at": "2024-05-01T12:00:00Z",
        "ended_at": "2024-05-01T12:00:01Z",
        "outcome": "granted",
    }
    with pytest.raises(BadRequest, match="product: must not contain control characters"):
        parse_usage_record(record)
    # a checkout's product must name a catalogue entry: no pattern to pay on every checkout
    req = parse_request({"id": 5, "op": "checkout", "product": "A\x07", "version": "1"})
    assert req.product == "A\x07"


def test_names_beyond_ascii_are_names():
    req = parse_request({"id": 5, "op": "checkout", "product": "Édit.exe", "version": "ß 1"})
    assert (req.product, req.version) == ("Édit.exe", "ß 1")


@pytest.mark.parametrize(
    ("text", "epoch"),
    [
        ("2016-12-31T23:59:60Z", 1483228800.0),  # a leap second: the next minute's start
        ("2017-01-01T00:59:60+01:00", 1483228800.0),
        ("2024-05-01T12:00:00.1234567891234Z", 1714564800.123456),  # past nanoseconds
        ("2024-05-01T12:00:00Z", 1714564800.0),
    ],
)
def test_rfc3339_times_rfc3339_allows(text, epoch):
    assert parse_time(text, "t") == pytest.approx(epoch, abs=1e-6)


@pytest.mark.parametrize("text", ["2016-12-31T12:00:60Z", "2017-01-01T00:59:60Z"])
def test_a_second_60_is_refused_but_at_the_end_of_a_utc_day(text):
    with pytest.raises(BadRequest, match="RFC 3339"):
        parse_time(text, "t")


@pytest.mark.parametrize(
    "text",
    [
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:60Z",
        "9999-12-31T23:59:59-00:01",
        # a leap second whose offset takes it outside: OverflowError, answered `internal`
        # (found by a fuzz campaign)
        "9999-12-31T23:59:60-23:59",
        "0001-01-01T00:00:60+00:01",
        "9999-12-31T23:59:60.5-00:01",
    ],
)
def test_a_time_outside_the_years_one_to_9999_in_utc_is_a_bad_request(text):
    """Found by a review: an offset or a leap second named an instant outside the years a
    UTC time can be written for; `report` accepted it and failed writing its reply's head
    (`internal_error`)."""
    with pytest.raises(BadRequest, match="since: outside the years 1 to 9999"):
        parse_time(text, "since")
    assert parse_time("0001-01-01T00:00:00Z", "since") == -62135596800.0
    assert parse_time("9999-12-31T23:59:59Z", "since") == 253402300799.0


@pytest.mark.parametrize(
    ("text", "end_of_day"), [("9999-12-31", True), ("0001-01-01T00:00:00+01:00", False)]
)
def test_metering_admin_report_refuses_such_a_time_as_a_usage_error(text, end_of_day):
    with pytest.raises(AdminError, match="outside the years 1 to 9999") as info:
        _when(text, "--until", end_of_day=end_of_day)
    assert info.value.code == EX_USAGE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01t08:00:00z", 1714550400.0),  # RFC 3339 allows lower case
        ("2016-12-31T23:59:60Z", 1483228800.0),  # a leap second: the next minute's start
        ("2024-05-01T10:00:00+02:00", 1714550400.0),
    ],
)
def test_metering_admin_report_reads_times_as_the_server_does(text, expected):
    """Found by a review: `--since`/`--until` refused RFC 3339 times the server's `report`
    takes (a lower-case `t`/`z`, a leap second) as "expected an RFC 3339 time"."""
    assert _when(text, "--since") == expected == parse_time(text, "since")


def test_metering_admin_report_names_the_option_and_the_text_it_cannot_read():
    with pytest.raises(AdminError, match=r"--since '2024-13-01T00:00:00Z': expected an RFC 3339"):
        _when("2024-13-01T00:00:00Z", "--since")
