from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from joynode.control import jsonrpc
from joynode.control.jsonrpc import Invalid, Request


def only(text: str) -> jsonrpc.Parsed:
    parsed, is_batch = jsonrpc.parse_frame(text)
    assert not is_batch
    assert len(parsed) == 1
    return parsed[0]


def test_request_and_notification() -> None:
    assert only('{"jsonrpc":"2.0","id":1,"method":"a","params":{"x":1}}') == Request(
        "a", {"x": 1}, 1, is_notification=False
    )
    assert only('{"jsonrpc":"2.0","method":"a"}') == Request("a", None, None, is_notification=True)


@pytest.mark.parametrize(
    ("text", "code", "request_id"),
    [
        ("{", jsonrpc.PARSE_ERROR, None),
        ("NaN", jsonrpc.PARSE_ERROR, None),
        ("[" * 100_000, jsonrpc.PARSE_ERROR, None),
        ("1" * 5000, jsonrpc.PARSE_ERROR, None),
        ("[]", jsonrpc.INVALID_REQUEST, None),
        ('"x"', jsonrpc.INVALID_REQUEST, None),
        ('{"jsonrpc":"1.0","id":3,"method":"a"}', jsonrpc.INVALID_REQUEST, 3),
        ('{"jsonrpc":"2.0","id":3}', jsonrpc.INVALID_REQUEST, 3),
        ('{"jsonrpc":"2.0","id":3,"method":7}', jsonrpc.INVALID_REQUEST, 3),
        ('{"jsonrpc":"2.0","id":3,"method":"a","params":5}', jsonrpc.INVALID_REQUEST, 3),
        ('{"jsonrpc":"2.0","id":[1],"method":"a"}', jsonrpc.INVALID_REQUEST, None),
        ('{"jsonrpc":"2.0","id":true,"method":"a"}', jsonrpc.INVALID_REQUEST, None),
    ],
)
def test_malformed_frames_become_error_responses(text: str, code: int, request_id: object) -> None:
    item = only(text)
    assert isinstance(item, Invalid)
    assert item.error.code == code
    assert item.id == request_id


def test_batch_keeps_valid_and_invalid_entries_in_order() -> None:
    parsed, is_batch = jsonrpc.parse_frame('[{"jsonrpc":"2.0","id":1,"method":"a"}, 5]')
    assert is_batch
    assert isinstance(parsed[0], Request)
    assert isinstance(parsed[1], Invalid)


@given(st.text(max_size=300))
def test_parsing_never_raises(text: str) -> None:
    parsed, _ = jsonrpc.parse_frame(text)
    assert parsed


def test_nesting_is_bounded_but_brackets_in_strings_do_not_count() -> None:
    deep = "[" * (jsonrpc.MAX_NESTING + 1) + "]" * (jsonrpc.MAX_NESTING + 1)
    item = only(deep)
    assert isinstance(item, Invalid)
    assert "nested deeper" in item.error.message
    in_string = '{"jsonrpc":"2.0","id":1,"method":"a","params":{"s":"' + "[{" * 500 + '\\""}}'
    assert isinstance(only(in_string), Request)
