"""Request bodies, one policy for the whole control service (the front door's model routes and
every Flask route alike):

- **Content-Encoding:** a body may come as is (`identity`), or encoded with `gzip` (`x-gzip`)
  or `deflate` (zlib, or raw deflate as some clients send it); it is decoded here, strictly: a
  stream that does not decode, ends early (a truncated upload is never taken as complete) or
  has bytes after its end is a 400 naming the encoding. Each route's cap counts the decoded
  bytes, so a gzip bomb is a 413 long before it inflates. Any other encoding, or encodings
  stacked, is a 415 naming what is accepted. A model's adapter is always given decoded bytes.
- **Bodies in flight:** `BodyBudget` bounds the bytes of request bodies the service holds in
  memory at once, across all requests (MODELPLANE_MAX_BODIES_IN_FLIGHT). A request whose
  declared length, or whose bytes as they stream in, would pass it is answered 503 with
  `Retry-After`; its bytes are released when it ends, however it ends.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
import zlib
from typing import Optional

from control.errors import BadRequest, PlaneError, TooLarge, UnsupportedType

log = logging.getLogger(__name__)

CHUNK = 1 << 20
ACCEPTED_ENCODINGS = ("gzip", "x-gzip", "deflate")
ACCEPTED_TEXT = "send the body unencoded (identity), or encoded with gzip or deflate"


def body_encoding(values: list[str]) -> Optional[str]:
    """The one Content-Encoding of a body (None: identity), from the header's values;
    UnsupportedType (415) for any other, or for more than one."""
    codings = [c.strip().lower() for value in values for c in value.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in ACCEPTED_ENCODINGS:
        return "gzip" if codings[0] == "x-gzip" else codings[0]
    shown = ", ".join(values)[:100]
    raise UnsupportedType(f"Content-Encoding {shown!r} is not accepted; {ACCEPTED_TEXT}")


class Decoder:
    """Decodes a gzip or deflate body piece by piece, never more than `pull`'s `max_out` at a
    time (whatever the ratio), and knows whether the stream ended where it should."""

    def __init__(self, encoding: str):
        self.encoding = encoding
        self._z = None
        self._tail = b""      # wire bytes not decoded yet
        self.started = False

    @property
    def need_input(self) -> bool:
        return not self._tail

    def push(self, data: bytes) -> None:
        self._tail = data

    def _start(self, data: bytes) -> None:
        if self.encoding == "deflate":
            # RFC 9110's deflate is the zlib format; some clients send raw deflate: the zlib
            # header (CM=8, the check bits) tells one from the other
            zlib_header = data[0] & 0x0F == 8 and (len(data) < 2 or (data[0] << 8 | data[1]) % 31 == 0)
            self._z = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
        else:
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.started = True

    def pull(self, max_out: int = CHUNK) -> bytes:
        """Up to `max_out` decoded bytes from what was pushed (b"" once it is all decoded)."""
        data = self._tail
        if not data:
            return b""
        if self._z is None:
            self._start(data)
        elif self._z.eof:
            if self.encoding == "gzip" and data[:2] == b"\x1f\x8b"[:len(data[:2])]:
                self._start(data)        # another gzip member (RFC 1952 allows several)
            else:
                raise BadRequest(f"the {self.encoding} body (its Content-Encoding) has bytes after its end")
        try:
            out = self._z.decompress(data, max_out)
        except zlib.error as e:
            raise BadRequest(f"the body does not decode as {self.encoding} (its Content-Encoding): {e}") from None
        self._tail = self._z.unused_data if self._z.eof else self._z.unconsumed_tail
        return out

    def finish(self) -> None:
        """At the end of the wire bytes: the stream must have ended too."""
        if self._z is None or not self._z.eof or self._tail:
            raise BadRequest(f"the {self.encoding} body (its Content-Encoding) is truncated: it ends before its "
                             "compressed stream does")


class Busy(PlaneError):
    """Too many request bytes in flight: try again shortly (503 with Retry-After)."""

    status = 503
    retry_after = 1


class BodyBudget:
    """The bytes of request bodies held in memory across the service, bounded by `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._freed_since_trim = 0
        self._last_trim = 0.0

    def take(self, n: int, *, whole: int = 0) -> None:
        """Hold `n` more bytes, or Busy (nothing held) when that passes the limit; TooLarge when
        the request's `whole` body could never fit, however long it waited."""
        if n <= 0:
            return
        if whole > self.limit:
            raise TooLarge(f"the body is {whole:,} bytes or more; the control service holds at most {self.limit:,} "
                           "bytes of request bodies at once (MODELPLANE_MAX_BODIES_IN_FLIGHT)")
        with self._lock:
            if self.held + n > self.limit:
                held = self.held
            else:
                self.held += n
                self.peak = max(self.peak, self.held)
                return
        raise Busy(f"the control service holds {held:,} bytes of request bodies in flight; this body would pass "
                   f"its budget of {self.limit:,} (MODELPLANE_MAX_BODIES_IN_FLIGHT): retry shortly")

    def give_back(self, n: int) -> bool:
        """Release `n` bytes; True when the memory is worth returning to the system now
        (nothing in flight, and at least TRIM_AFTER freed since the last time)."""
        if n <= 0:
            return False
        with self._lock:
            self.held -= n
            self._freed_since_trim += n
            if self.held == 0 and self._freed_since_trim >= TRIM_AFTER and time.monotonic() - self._last_trim > 1.0:
                self._freed_since_trim = 0
                self._last_trim = time.monotonic()
                return True
        return False


#: Bytes of large bodies freed before the allocator is asked to return memory to the system.
TRIM_AFTER = 64 * 2**20

_libc = None


def trim_memory() -> None:
    """Return freed heap memory to the system (glibc's malloc_trim): large bodies freed after a
    flood otherwise stay in the process's arenas. A no-op where there is no glibc."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)
