"""parse_size: human byte sizes with binary units."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memlend.errors import UserError
from memlend.sizes import parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("4K", 4096),
        ("4k", 4096),
        ("64M", 64 << 20),
        ("64MiB", 64 << 20),
        ("64MB", 64 << 20),
        ("64 M", 64 << 20),
        ("1.5G", 3 << 29),
        ("2T", 2 << 40),
        ("512B", 512),
        (" 8K ", 8192),
    ],
)
def test_valid(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["12XB", "", "K", "-5", "-5M", "nan", "inf", "1e3", "4KK", "M4"])
def test_invalid(text: str) -> None:
    with pytest.raises(UserError, match="invalid size"):
        parse_size(text)


def test_message_explains_the_format() -> None:
    with pytest.raises(UserError) as e:
        parse_size("12XB")
    assert str(e.value) == (
        "invalid size '12XB' (expected a number with an optional K, M, G or T suffix, e.g. 64M)"
    )


@pytest.mark.parametrize("text", ["0", "0K", "0.0M"])
def test_zero_rejected(text: str) -> None:
    with pytest.raises(UserError, match="invalid size"):
        parse_size(text)


@given(st.integers(1, 1 << 20), st.sampled_from(["", "K", "M", "G", "T"]))
def test_whole_numbers_round_trip(n: int, unit: str) -> None:
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    assert parse_size(f"{n}{unit}") == n * mult
