"""pika's header decoder made total (producers/headers.py): every value a broker passes on is
read, so one hostile header cannot stall a consumer on a frame that never decodes."""

from __future__ import annotations

import math
import struct

import pika.data
import pytest
from hypothesis import given
from hypothesis import strategies as st

from producers.headers import TOO_DEEP, tolerate_hostile_headers


def _table(*items: tuple[bytes, bytes]) -> bytes:
    body = b"".join(bytes([len(k)]) + k + v for k, v in items)
    return struct.pack(">I", len(body)) + body


def _nested(depth: int) -> bytes:
    value = b"I" + struct.pack(">i", 1)
    for _ in range(depth):
        value = b"F" + _table((b"a", value))
    return value


@pytest.fixture(autouse=True)
def tolerant() -> None:
    tolerate_hostile_headers()


def test_values_pika_cannot_decode_become_plain_values() -> None:
    table = _table(
        (b"ts", b"T" + struct.pack(">Q", 2**64 - 1)),
        (b"f", b"f" + struct.pack(">f", math.inf)),
        (b"d", b"d" + struct.pack(">d", math.nan)),
        (b"deep", _nested(5000)),
        (b"after", b"I" + struct.pack(">i", 7)),
    )
    decoded, end = pika.data.decode_table(table, 0)
    assert end == len(table)
    assert decoded["ts"] == 2**64 - 1 and decoded["f"] == math.inf
    assert math.isnan(decoded["d"]) and decoded["after"] == 7
    inner = decoded["deep"]
    while isinstance(inner, dict):
        inner = inner["a"]
    assert inner == TOO_DEEP


def test_installing_twice_wraps_once() -> None:
    first = pika.data.decode_value
    tolerate_hostile_headers()
    assert pika.data.decode_value is first


@given(st.integers(0, 2**64 - 1))
def test_any_timestamp_decodes(value: int) -> None:
    decoded, _ = pika.data.decode_table(_table((b"t", b"T" + struct.pack(">Q", value))), 0)
    assert decoded["t"] is not None
