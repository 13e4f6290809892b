"""The one price schema every source produces, and the row validation that guards the lake.

Prices are stored as the exchange printed them: ``open/high/low/close`` unadjusted, ``adj_close``
adjusted for splits and dividends (use it for returns), ``volume`` in shares.
Invalid rows are never dropped silently: ``validate_prices`` returns them with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

PRICE_COLUMNS: dict[str, pl.DataType] = {
    "ticker": pl.String(),
    "date": pl.Date(),
    "open": pl.Float64(),
    "high": pl.Float64(),
    "low": pl.Float64(),
    "close": pl.Float64(),
    "adj_close": pl.Float64(),
    "volume": pl.Float64(),  # float on input (sources may hand NaN); Int64 once validated
    "source": pl.String(),
}
PRICE_FIELDS = ("open", "high", "low", "close", "adj_close")

# Relative slack for OHLC containment: vendors round open/close and high/low independently.
OHLC_TOLERANCE = 1e-6


def conform(frame: pl.DataFrame) -> pl.DataFrame:
    """Cast a source frame to the canonical schema (column order and dtypes); missing columns are an error."""
    missing = [c for c in PRICE_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"price frame lacks columns {missing}; has {frame.columns}")
    return frame.select([pl.col(c).cast(t, strict=False) for c, t in PRICE_COLUMNS.items()])


@dataclass(frozen=True)
class ValidatedPrices:
    clean: pl.DataFrame  # canonical schema, volume Int64, unique (ticker, date)
    rejects: pl.DataFrame  # canonical schema + "reason"


def _bad(expr: pl.Expr) -> pl.Expr:
    # A comparison with a missing value is not a second reason: "missing …" already names it.
    return expr.fill_null(False)


def validate_prices(frame: pl.DataFrame) -> ValidatedPrices:
    """Split rows into clean ones and rejects, each reject carrying every reason it failed."""
    df = conform(frame).with_columns(pl.col(PRICE_FIELDS).fill_nan(None), pl.col("volume").fill_nan(None))
    tol = 1.0 + OHLC_TOLERANCE
    checks: list[tuple[str, pl.Expr]] = [
        ("missing ticker or date", pl.col("ticker").is_null() | pl.col("date").is_null()),
        ("missing price (NaN/null)", pl.any_horizontal([pl.col(c).is_null() for c in PRICE_FIELDS])),
        ("non-positive price", _bad(pl.any_horizontal([pl.col(c) <= 0 for c in PRICE_FIELDS]))),
        ("high below low", _bad(pl.col("high") < pl.col("low"))),
        (
            "open/close outside high-low range",
            _bad(
                (pl.max_horizontal("open", "close") > pl.col("high") * tol)
                | (pl.min_horizontal("open", "close") * tol < pl.col("low"))
            ),
        ),
        ("missing volume", pl.col("volume").is_null()),
        ("negative volume", _bad(pl.col("volume") < 0)),
    ]
    reasons = pl.concat_str(
        [pl.when(cond).then(pl.lit(label)) for label, cond in checks], separator="; ", ignore_nulls=True
    )
    df = df.with_columns(reason=reasons.fill_null(""))  # concat of all-nulls is null: no reason

    # Duplicate keys among otherwise valid rows: identical copies collapse to one row (the extra copies
    # are rejected, so nothing disappears unseen); conflicting copies are all rejected - we cannot know
    # which one is true.
    value_cols = [c for c in PRICE_COLUMNS if c not in ("ticker", "date")]
    valid = df.filter(pl.col("reason") == "").with_row_index("_row")
    key = ["ticker", "date"]
    valid = valid.with_columns(
        _copies=pl.len().over(key),
        _variants=pl.struct(value_cols).n_unique().over(key),
        _nth=pl.col("_row").rank("ordinal").over(key),
    )
    dup_reason = (
        pl.when(pl.col("_variants") > 1)
        .then(pl.lit("duplicate key with conflicting values"))
        .when(pl.col("_nth") > 1)
        .then(pl.lit("duplicate key (identical copy)"))
        .otherwise(pl.lit(""))
    )
    valid = valid.with_columns(reason=dup_reason)
    helper = ["_row", "_copies", "_variants", "_nth"]
    clean = (
        valid.filter(pl.col("reason") == "")
        .drop(helper + ["reason"])
        .with_columns(pl.col("volume").round(0).cast(pl.Int64))
        .sort(key)
    )
    rejects = pl.concat(
        [df.filter(pl.col("reason") != ""), valid.filter(pl.col("reason") != "").drop(helper)],
        how="vertical",
    )
    return ValidatedPrices(clean=clean, rejects=rejects)
