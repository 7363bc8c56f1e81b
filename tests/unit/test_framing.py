import pytest

from metering_protocol.errors import BadRequest
from metering_protocol.framing import FrameDecoder, decode, encode


def test_frames_split_across_feeds_and_blank_lines_skipped():
    d = FrameDecoder(100)
    assert d.feed(b'{"id":1') == []
    assert d.feed(b',"op":"ping"}\n\n  \r\n{"id":2}\n{"id"') == [
        b'{"id":1,"op":"ping"}',
        b'{"id":2}',
    ]
    assert d.pending == 5
    assert d.overflow is None


def test_byte_by_byte_feed_yields_the_same_frames():
    data = b'{"a":1}\n{"b":"\xc3\xa9"}\n'
    d = FrameDecoder(100)
    frames = [f for i in range(len(data)) for f in d.feed(data[i : i + 1])]
    assert [decode(f) for f in frames] == [{"a": 1}, {"b": "é"}]


def test_a_run_of_blank_lines_is_skipped_whole():
    """Found by a review: one Python step per blank line let a peer sending only newlines
    keep the event loop busy; a run of blanks is skipped in one step."""
    d = FrameDecoder(10)
    assert d.feed(b"\n" * 1_000_000 + b" \t\r\n  {} \r\n" + b"\r\n" * 1000) == [b"{}"]
    assert d.pending == 0 and d.overflow is None
    assert d.feed(b" " * 100) == [] and d.pending == 0  # blanks without a newline: dropped


def test_at_most_max_frames_are_split_and_the_rest_waits_for_a_later_feed():
    """Before hello a connection splits only the few frames a peer may send before it is
    closed; the rest of its read waits, whole, for `feed(b"")` - even when it is longer
    than a frame may be."""
    d = FrameDecoder(8)
    data = b"".join(b'{"n":%d}\n' % i for i in range(6))
    assert d.feed(data, max_frames=2) == [b'{"n":0}', b'{"n":1}']
    assert d.pending == len(data) - 16 and d.overflow is None
    assert d.feed(b"", max_frames=1) == [b'{"n":2}']
    assert d.feed(b"") == [b'{"n":3}', b'{"n":4}', b'{"n":5}']
    assert d.pending == 0


def test_oversized_frame_keeps_earlier_frames_then_overflows():
    d = FrameDecoder(10)
    frames = d.feed(b'{"a":1}\n' + b"x" * 20 + b"\n" + b'{"b":2}\n')
    assert frames == [b'{"a":1}']
    assert d.overflow is not None and d.overflow.code == "too_large"
    assert d.feed(b'{"c":3}\n') == []  # framing is lost for good


def test_oversized_frame_without_newline_overflows_early():
    d = FrameDecoder(10)
    assert d.feed(b"y" * 11) == []
    assert d.overflow is not None


def test_frame_exactly_at_the_limit_is_accepted():
    d = FrameDecoder(8)
    assert d.feed(b'{"a":12}\n') == [b'{"a":12}']


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"a":NaN}', "invalid JSON"),
        (b'{"a":Infinity}', "invalid JSON"),
        (b'{"a":"\\ud800"}', "surrogate"),
        (b'{"a":"\xff"}', "UTF-8"),
        (b"[1,2]", "must be a JSON object"),
        (b"42", "must be a JSON object"),
        (b"{", "invalid JSON"),
    ],
)
def test_strict_decoding_names_the_problem(raw, needle):
    with pytest.raises(BadRequest) as err:
        decode(raw)
    assert needle in err.value.message


def test_encode_is_one_line():
    out = encode({"id": 1, "ok": True, "text": "a\nb"})
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    assert decode(out.rstrip(b"\n")) == {"id": 1, "ok": True, "text": "a\nb"}


def test_deeply_nested_json_is_a_bad_request_not_a_crash():
    with pytest.raises(BadRequest, match="nested too deeply"):
        decode(b"[" * 30000 + b"]" * 30000)
    with pytest.raises(BadRequest, match="nested too deeply"):
        decode(b'{"id":1,"op":"ping","x":' + b"[" * 30000 + b"]" * 30000 + b"}")
