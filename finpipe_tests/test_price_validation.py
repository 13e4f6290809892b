"""Row validation: every kind of bad row is rejected with its reason, nothing disappears."""

import math

import polars as pl
import pytest

from finpipe.market.schema import validate_prices
from finpipe_tests.helpers import d

GOOD = dict(ticker="AAA", date=d("2024-01-02"), open=10.0, high=11.0, low=9.5, close=10.5, adj_close=10.4,
            volume=1000.0, source="test")


def row(**changes):
    return {**GOOD, **changes}


@pytest.mark.parametrize(
    "bad, reason",
    [
        (row(open=math.nan), "missing price (NaN/null)"),
        (row(adj_close=None), "missing price (NaN/null)"),
        (row(close=-1.0, low=-2.0), "non-positive price"),
        (row(high=9.0, low=9.5, open=9.2, close=9.3), "high below low"),
        (row(open=12.0), "open/close outside high-low range"),
        (row(volume=-5.0), "negative volume"),
        (row(volume=math.nan), "missing volume"),
        (row(date=None), "missing ticker or date"),
    ],
)
def test_each_kind_of_bad_row_is_rejected_with_its_reason(bad, reason):
    result = validate_prices(pl.DataFrame([GOOD | {"ticker": "OK"}, bad]))
    assert result.clean["ticker"].to_list() == ["OK"]
    assert result.rejects.height == 1
    assert reason in result.rejects["reason"][0]


def test_identical_duplicate_keeps_one_row_and_rejects_the_copy():
    result = validate_prices(pl.DataFrame([GOOD, GOOD]))
    assert result.clean.height == 1
    assert result.rejects["reason"].to_list() == ["duplicate key (identical copy)"]


def test_conflicting_duplicates_are_all_rejected():
    result = validate_prices(pl.DataFrame([GOOD, row(close=10.6)]))
    assert result.clean.height == 0
    assert result.rejects["reason"].to_list() == ["duplicate key with conflicting values"] * 2


def test_clean_rows_keep_values_and_get_integer_volume():
    result = validate_prices(pl.DataFrame([GOOD]))
    assert result.rejects.height == 0
    assert result.clean.schema["volume"] == pl.Int64
    assert result.clean.row(0, named=True) == GOOD | {"volume": 1000}


def test_missing_column_is_a_clear_error():
    with pytest.raises(ValueError, match="lacks columns"):
        validate_prices(pl.DataFrame([GOOD]).drop("adj_close"))
