"""Drift-aware retraining (issue 30): the drift math on hand-made frames, and the sensor on a simulated lake."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import numpy as np
import polars as pl
import pytest

from finpipe.statistics.drift import DriftSpec, compare, drift_since, ks_2samp, psi


def frame(tickers, days, seed, scale=1.0, start=dt.date(2020, 1, 1)):
    rng = np.random.default_rng(seed)
    rows = [{"ticker": t, "date": start + dt.timedelta(days=i), "daily_return": rng.normal(0, 0.0125 * scale),
             "volatility_20d": abs(rng.normal(0.2 * scale, 0.03 * scale)), "rsi_14": float(np.clip(rng.normal(50, 10), 0, 100))}
            for t in tickers for i in range(days)]
    return pl.DataFrame(rows)


def test_the_same_distribution_does_not_drift_and_a_shifted_one_does():
    reference = frame(["A", "B", "C"], 250, seed=1)
    same = frame(["A", "B", "C"], 20, seed=2, start=dt.date(2021, 1, 1))
    quiet = compare(reference, same)
    assert not quiet.drifted and quiet.reason.startswith("no drift")
    assert all(f.psi < 0.25 for f in quiet.features) and 0.67 < quiet.volatility_ratio < 1.5
    shocked = compare(reference, frame(["A", "B", "C"], 20, seed=2, scale=3.0, start=dt.date(2021, 1, 1)))
    assert shocked.drifted and shocked.volatility_shift
    assert {f.feature for f in shocked.features if f.drifted} >= {"daily_return", "volatility_20d"}
    assert "volatility regime 3." in shocked.reason and "daily_return PSI" in shocked.reason


def test_a_ticker_the_champion_never_saw_is_drift():
    reference = frame(["A", "B"], 250, seed=1)
    report = compare(reference, frame(["A", "B", "NEW"], 20, seed=2, start=dt.date(2021, 1, 1)))
    assert report.drifted and report.new_tickers == ("NEW",) and "new tickers NEW" in report.reason
    assert report.scores()["new_tickers"] == "NEW"


def test_psi_and_ks_agree_with_their_definitions():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 5000), rng.normal(0, 1, 5000)
    assert psi(a, a) == pytest.approx(0.0) and psi(a, b) < 0.02 and psi(a, b + 1.0) > 0.5
    d, p = ks_2samp(a, b)
    assert d < 0.04 and p > 0.01
    d, p = ks_2samp(a, b + 0.5)
    assert d > 0.15 and p < 1e-10


def test_no_verdict_before_enough_sessions_after_the_training_window():
    stats = frame(["A"], 260, seed=1)
    last_trained = stats["date"][-6]
    assert "5 session(s) after" in drift_since(stats, None, last_trained, DriftSpec(min_sessions=10))
    with pytest.raises(ValueError, match="min_sessions"):
        DriftSpec(min_sessions=30, window_sessions=20)


def test_the_simulated_sources_shock_changes_only_the_sessions_from_its_date():
    from finpipe.market.sources.simulated import SimulatedSource

    def path(**shock):
        return SimulatedSource("XNYS", **shock).fetch(["SIMA"], dt.date(2012, 11, 1), dt.date(2013, 1, 31)).frame

    quiet, shocked = path(), path(shock_from=dt.date(2013, 1, 2), shock_volatility=4.0)
    before = pl.col("date") < dt.date(2013, 1, 2)
    assert quiet.filter(before).equals(shocked.filter(before))
    returns = lambda f: f.filter(~before)["close"].log().diff().drop_nulls().std()  # noqa: E731
    assert returns(shocked) > 2.5 * returns(quiet)
    with pytest.raises(ValueError, match="shock_volatility"):
        SimulatedSource("XNYS", shock_volatility=0.0)


# ------------------------------------------------------------------ the sensor, on a lake the simulated source filled

TICKERS = ["SIMA", "SIMB", "SIMC", "SIMD"]


def simulated_lake(lake_resources, **shock):
    """A simulated lake (4 tickers, 2012 .. January 2013) with statistics, and a champion trained on 2012."""
    from finpipe.defs.statistics import price_statistics
    from finpipe.market.lake import PriceLake
    from finpipe.models.registry import RunRegistry
    from finpipe_tests.helpers import ingest

    resources = lake_resources(source="simulated", tickers=TICKERS, **shock)
    ingest(resources, first="2012-01-03", last="2013-01-31")
    assert dg.materialize([price_statistics], resources=resources).success
    RunRegistry(PriceLake(resources["lake"].db_path)).record({
        "run_id": "champ", "created_at": dt.datetime(2013, 1, 2), "base_model": "tiny", "quantization": "none",
        "train_first": dt.date(2012, 3, 1), "train_last": dt.date(2012, 12, 31), "val_cutoff": dt.date(2012, 12, 31),
        "config_hash": "x", "adapter_path": "/nowhere", "status": "champion"})
    return resources


def evaluate(resources, cursor=None, nightly_run_of=None):
    """One tick of the sensor (``nightly_run_of``: a session the instance already holds a nightly_retrain run of)."""
    from dagster._core.test_utils import create_run_for_test

    from finpipe.defs.automation import retrain_on_drift

    with dg.instance_for_test() as instance:
        if nightly_run_of:
            create_run_for_test(instance, job_name="nightly_retrain", tags={"dagster/partition": nightly_run_of})
        return retrain_on_drift(dg.build_sensor_context(instance=instance, resources={"lake": resources["lake"]},
                                                        cursor=cursor))


def test_a_volatility_shock_requests_a_retraining_run_with_the_reason_in_its_tags(lake_resources):
    from finpipe.defs.automation import NIGHTLY_RUN_CONFIG

    resources = simulated_lake(lake_resources, simulation_shock_from="2013-01-02", simulation_shock_volatility=4.0)
    result = evaluate(resources)
    assert result.skip_reason is None and len(result.run_requests) == 1, result.skip_reason
    request = result.run_requests[0]
    assert request.partition_key == "2013-01-31" and request.run_key == "drift-2013-01-31"
    assert request.run_config == NIGHTLY_RUN_CONFIG and request.job_name in (None, "nightly_retrain")
    tags = request.tags
    assert tags["finpipe/trigger"] == "drift" and tags["finpipe/drift_champion"] == "champ"
    assert "volatility_regime" in tags["finpipe/drift_signals"] and "daily_return" in tags["finpipe/drift_signals"]
    reason = tags["finpipe/drift_reason"]
    assert reason.startswith("drift: daily_return PSI") and "volatility regime" in reason
    assert "(2013-01-03..2013-01-31 vs the champion's window 2012-03-01..2012-12-31)" in reason and len(reason) <= 250
    again = evaluate(resources, cursor=result.cursor)  # the same latest session is not evaluated twice
    assert not again.run_requests and "already checked" in again.skip_reason.skip_message
    scheduled = evaluate(resources, nightly_run_of="2013-01-31")  # the schedule already ran that session
    assert not scheduled.run_requests and "already exists" in scheduled.skip_reason.skip_message


def test_a_quiet_month_skips_with_its_scores_and_no_champion_skips_too(lake_resources):
    resources = simulated_lake(lake_resources)
    result = evaluate(resources)
    assert not result.run_requests and result.skip_reason.skip_message.startswith("no drift: largest PSI"), result
    assert "volatility_20d_psi" in result.skip_reason.skip_message and result.cursor
    from finpipe.market.lake import PriceLake

    with PriceLake(resources["lake"].db_path).connect() as con:
        con.execute("UPDATE model_runs SET status = 'retired'")
    assert "no champion yet" in evaluate(resources).skip_reason.skip_message


def test_finpipe_runs_shows_what_triggered_each_run(lake_resources, capsys):
    """The evaluation asset records the run's finpipe/trigger and finpipe/drift_reason tags in model_runs
    (``registry_row``); `finpipe runs` shows them."""
    from finpipe.market.lake import PriceLake
    from finpipe.models.registry import RunRegistry
    from finpipe_tests.helpers import cli

    registry = RunRegistry(PriceLake(lake_resources()["lake"].db_path))
    reason = "drift: volatility regime 2.91x (2013-01-03..2013-01-31 vs the champion's window 2012-03-01..2012-12-31)"
    for run_id, trigger, why in (("r1", "nightly", None), ("r2", "drift", reason)):
        registry.record({"run_id": run_id, "created_at": dt.datetime(2013, 2, int(run_id[1])), "base_model": "tiny",
                         "quantization": "none", "config_hash": "x", "adapter_path": "/nowhere",
                         "run_trigger": trigger, "trigger_reason": why})
    assert registry.get("r2")["trigger_reason"] == reason
    code, out, _ = cli(capsys, "runs")
    assert code == 0 and "trigger" in out and "nightly" in out and "drift: volatility regime 2.91x" in out
