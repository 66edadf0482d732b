from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import given
from hypothesis import strategies as st

from joynode import wire


def strategy_for(info: mi.Type) -> st.SearchStrategy[Any]:
    """Values that satisfy a msgspec type, caps included, for any message type."""
    if isinstance(info, mi.IntType):
        lo = info.ge if info.ge is not None else -(2**63)
        hi = info.le if info.le is not None else 2**64 - 1
        return st.integers(lo, hi)
    if isinstance(info, mi.StrType) and info.pattern is not None:
        return st.from_regex(info.pattern, fullmatch=True)
    if isinstance(info, mi.StrType):
        low = info.min_length or 0
        return st.text(min_size=low, max_size=max(low, min(info.max_length or 64, 64)))
    if isinstance(info, mi.BytesType):
        low = info.min_length or 0
        return st.binary(min_size=low, max_size=max(low, min(info.max_length or 96, 96)))
    if isinstance(info, mi.BoolType):
        return st.booleans()
    if isinstance(info, mi.NoneType):
        return st.none()
    if isinstance(info, mi.UnionType):
        return st.one_of(*(strategy_for(option) for option in info.types))
    if isinstance(info, mi.FloatType):
        floor = info.ge if info.ge is not None else info.gt
        return st.floats(
            min_value=floor,
            max_value=info.le,
            exclude_min=info.gt is not None,
            allow_nan=False,
            allow_infinity=False,
        )
    if isinstance(info, mi.ListType):
        low = info.min_length or 0
        return st.lists(
            strategy_for(info.item_type),
            min_size=low,
            max_size=max(low, min(info.max_length or 8, 8)),
        )
    if isinstance(info, mi.StructType):
        fields = {f.encode_name: strategy_for(f.type) for f in info.fields}
        return st.fixed_dictionaries(fields).map(lambda kw: info.cls(**kw))
    raise NotImplementedError(f"add a strategy for {info!r}")


any_message = st.one_of(*(strategy_for(mi.type_info(cls)) for cls in wire.MESSAGE_TYPES))


def test_message_types_are_the_union() -> None:
    union = mi.type_info(wire.AnyMessage)
    assert isinstance(union, mi.UnionType)
    assert {t.cls for t in union.types if isinstance(t, mi.StructType)} == set(wire.MESSAGE_TYPES)


@given(any_message)
def test_round_trip_every_message_type(message: wire.Message) -> None:
    assert wire.decode(wire.encode(message)) == message


@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_wire_error(frame: bytes) -> None:
    try:
        wire.decode(frame)
    except wire.WireError as exc:
        reason = exc.reason
    else:
        reason = "decoded"
    assert reason


@given(any_message, st.data())
def test_mutated_frames_raise_only_wire_error(message: wire.Message, data: st.DataObject) -> None:
    frame = bytearray(wire.encode(message))
    index = data.draw(st.integers(0, len(frame) - 1))
    frame[index] = data.draw(st.integers(0, 255))
    with contextlib.suppress(wire.WireError):
        wire.decode(bytes(frame))


def envelope(v: object, msg: object) -> bytes:
    return msgspec.msgpack.encode({"v": v, "msg": msg})


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "bad envelope"),
        (envelope(2, {"type": "ping", "nonce": 1}), "unsupported wire version 2"),
        (envelope(1, {"type": "nope"}), "Invalid value 'nope'"),
        (envelope(1, {"type": "ping"}), "missing required field `nonce`"),
        (envelope(1, {"type": "ping", "nonce": "1"}), "Expected `int`, got `str`"),
        (envelope(1, {"type": "ping", "nonce": -1}), "Expected `int` >= 0"),
        (envelope("1", {}), "bad envelope"),
        (msgspec.msgpack.encode([1, 2]), "bad envelope"),
        (
            envelope(1, {"type": "error", "code": 1, "reason": "x" * 1025}),
            "Expected `str` of length <= 1024",
        ),
    ],
)
def test_invalid_frames_say_why(frame: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason.replace("`", ".").replace("(", r"\(")):
        wire.decode(frame)


def test_unknown_fields_are_ignored() -> None:
    frame = envelope(1, {"type": "pong", "nonce": 7, "added_in_a_later_release": [1, 2]})
    assert wire.decode(frame) == wire.Pong(7)


def test_size_cap_applies_before_decoding() -> None:
    frame = wire.encode(wire.Ping(1))
    with pytest.raises(wire.WireError, match="exceeds cap of 4"):
        wire.decode(frame, max_bytes=4)


def test_encoding_refuses_oversize_frames() -> None:
    huge = wire.Heartbeat(0, "v" * 200, 1, ["a" * 256] * 16, ["m" * 128] * 64, 0, 0)
    assert len(wire.encode(huge)) < wire.MAX_FRAME_BYTES
    with pytest.raises(wire.WireError, match="exceeds cap"):
        wire.encode(wire.ErrorReply(1, "x" * (wire.MAX_FRAME_BYTES + 1)))


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(msgpack_values, msgpack_values)
def test_well_formed_msgpack_of_any_shape_raises_only_wire_error(v: object, msg: object) -> None:
    with contextlib.suppress(wire.WireError):
        wire.decode(envelope(v, msg))
