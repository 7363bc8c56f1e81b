"""NDJSON framing without I/O: `FrameDecoder.feed(bytes)` -> complete frames, `encode(obj)`.

Kept free of sockets so it can be tested byte by byte and reused by server, agent and tools.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .errors import BadRequest, TooLarge

DEFAULT_MAX_FRAME_BYTES = 65536
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def encode(message: dict[str, Any]) -> bytes:
    return _encoder.encode(message) + b"\n"


def decode(frame: bytes) -> dict[str, Any]:
    """Parse one frame strictly (no NaN/Infinity, valid UTF-8, no lone surrogates)."""
    try:
        obj = _decoder.decode(frame)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"frame is not valid UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply") from None
    except msgspec.DecodeError as exc:
        detail = str(exc)
        if detail == "Input data was truncated":
            detail = "JSON is malformed: truncated or lone surrogate escape"
        raise BadRequest(f"invalid JSON: {detail}") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"frame must be a JSON object, got {type(obj).__name__}")
    return obj


class FrameDecoder:
    """Splits a byte stream into frames; blank lines are skipped.

    A frame longer than `max_frame_bytes` sets `overflow` (a TooLarge error): the frames
    before it are still returned, framing is lost from there on, and the caller answers the
    error and closes the connection.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self.max_frame_bytes = max_frame_bytes
        self.overflow: TooLarge | None = None
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        if self.overflow is not None:
            return []
        self._buffer += data
        frames: list[bytes] = []
        start = 0
        buf = self._buffer
        limit = self.max_frame_bytes
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            if end - start > limit:
                self.overflow = TooLarge(f"frame of {end - start} bytes exceeds {limit}")
                buf.clear()
                return frames
            line = bytes(buf[start:end]).strip(b"\r \t")
            if line:
                frames.append(line)
            start = end + 1
        del buf[:start]
        if len(buf) > limit:
            self.overflow = TooLarge(f"frame exceeds {limit} bytes without a newline")
            buf.clear()
        return frames

    @property
    def pending(self) -> int:
        return len(self._buffer)
