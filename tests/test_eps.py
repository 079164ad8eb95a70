"""parse_eps (cpl_cert.eps): the one reader of radii, for the library and every command."""

from __future__ import annotations

import pytest

from cpl_cert.eps import EpsValue, parse_eps, parse_single_eps
from cpl_cert.errors import CplCertError


def test_parse_eps():
    values = parse_eps("0.1, 36/255,1e-2")
    assert [v.label for v in values] == ["0.1", "36/255", "1e-2"]
    assert values[1].value == pytest.approx(36 / 255)
    assert parse_eps(values)[1].label == "36/255"
    assert [v.value for v in parse_eps([0.5, "1/4", EpsValue(0.3, "x")])] == [0.5, 0.25, 0.3]
    for bad in ("abc", "0.1,,0.2", "-1", "0", "1/0", ""):
        with pytest.raises(CplCertError):
            parse_eps(bad)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("-1", "eps must be positive and finite, got '-1'"),
        ("0.1, -0.5", "eps must be positive and finite, got '-0.5'"),
        ("0", "eps must be positive and finite, got '0'"),
        ("inf", "eps must be positive and finite, got 'inf'"),
        ("nan", "eps must be positive and finite, got 'nan'"),
        (["-2"], "eps must be positive and finite, got '-2'"),
        ("abc", "cannot read eps 'abc'; write numbers like 0.25 or fractions like 36/255, separated by commas"),
        ("1/0", "cannot read eps '1/0': division by zero"),
        ([], "give at least one eps"),
    ],
)
def test_bad_eps_is_refused_with_one_sentence_that_says_why(spec, message):
    """A negative, zero or non-finite number is refused as such, not as unreadable (the messages the commands print)."""
    with pytest.raises(CplCertError) as info:
        parse_eps(spec)
    assert str(info.value) == message


def test_parse_single_eps():
    assert parse_single_eps("36/255") == EpsValue(36 / 255, "36/255")
    assert parse_single_eps(0.25) == EpsValue(0.25, "0.25")
    with pytest.raises(CplCertError, match="give one eps, got 2"):
        parse_single_eps("0.1,0.2")
