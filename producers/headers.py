"""Read any header a broker passes on, instead of failing the whole frame.

pika decodes message headers eagerly, before any handler runs, and a few well-formed AMQP
values make its decoder raise: a timestamp (``T``) beyond Python's datetimes, a float or double
(``f``, ``d``) that is infinite or NaN (pika turns them into ints), a table or array nested
deeper than the interpreter's recursion limit. RabbitMQ passes all of them on, so a publisher
could stall a consumer with one header: the frame fails in the I/O loop, the connection is
torn down, the message comes back, again and again. ``tolerate_hostile_headers`` wraps pika's
decoder so that such a value decodes to something plain (the raw integer, a float, a marker
string) and the message reaches its handler like any other. It is idempotent and called by
every connection exitpipe opens (``producers.connection.node_parameters``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pika.data

Decoder = Callable[[bytes, int], tuple[Any, int]]
TOO_DEEP = "<header nested too deeply>"
_SIZED = {b"F", b"A"}  # a table or an array: a 4-byte length, then that many bytes


def tolerate_hostile_headers() -> None:
    """Make pika's value decoder total (once per process)."""
    current: Any = pika.data.decode_value
    if getattr(current, "tolerant", False):
        return
    pika.data.decode_value = _tolerant(current)


def _tolerant(decode: Decoder) -> Decoder:
    def decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
        try:
            return decode(encoded, offset)
        except (OverflowError, ValueError, OSError, RecursionError):
            return _plain(encoded, offset)

    decode_value.tolerant = True  # type: ignore[attr-defined]
    return decode_value


def _plain(encoded: bytes, offset: int) -> tuple[Any, int]:
    """The value at ``offset`` as a plain Python value, for the kinds pika cannot decode."""
    kind = encoded[offset : offset + 1]
    at = offset + 1
    if kind == b"T":
        return struct.unpack_from(">Q", encoded, at)[0], at + 8
    if kind == b"f":
        return struct.unpack_from(">f", encoded, at)[0], at + 4
    if kind == b"d":
        return struct.unpack_from(">d", encoded, at)[0], at + 8
    if kind in _SIZED:
        length = struct.unpack_from(">I", encoded, at)[0]
        return TOO_DEEP, at + 4 + length
    raise pika.exceptions.InvalidFieldTypeException(kind)
