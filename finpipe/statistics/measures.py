"""Every statistic finpipe computes, defined once.

Conventions (all windows count *trading sessions*, i.e. rows of one ticker, never calendar days):

- Returns are **simple** returns on the split- and dividend-adjusted close ``adj_close``:
  ``ret_Nd(t) = adj_close(t) / adj_close(t - N) - 1``; ``daily_return = ret_1d``.
- Volatility: sample standard deviation (ddof = 1) of the last 20 daily returns, annualized by
  ``sqrt(252)``.
- Price levels (SMAs, 52-week high/low) are computed on ``adj_close`` and then expressed in the
  units of the date's printed close: ``level * close(t) / adj_close(t)``. A split or dividend inside a
  window therefore does not distort them, and they compare directly with the close a user sees.
- ``pct_vs_sma_N = close / sma_N - 1``.
- RSI-14: Wilder's RSI on ``adj_close`` changes: average gain/loss seeded with the simple mean of the
  first 14 changes, then ``avg = avg_prev * 13/14 + x / 14``; ``100 - 100 / (1 + avg_gain / avg_loss)``,
  100 when there were no losses. First value on the 15th row of a ticker.
- 52-week high/low: max/min adjusted close over the last 252 sessions (incl. today);
  ``dist_52w_high = close / high_52w - 1`` (<= 0), ``dist_52w_low = close / low_52w - 1`` (>= 0).
- ``max_drawdown_252d``: the worst peak-to-trough fall of ``adj_close`` within the last 252 sessions,
  as a negative fraction (0 when the price only rose).
- ``avg_volume_20d``: mean share volume of the last 20 sessions.
- ``rel_ret_Nd``: the ticker's ``ret_Nd`` minus the equal-weighted mean ``ret_Nd`` of all tickers of the
  same universe that have it on that date (cross-sectional relative performance).

A statistic is null until its window is full (no partial-window values).
"""

RETURN_WINDOWS = (1, 3, 5, 7, 14, 30)
SMA_WINDOWS = (10, 20, 50)
VOLATILITY_WINDOW = 20
RSI_WINDOW = 14
YEAR_WINDOW = 252
VOLUME_WINDOW = 20
TRADING_DAYS_PER_YEAR = 252
