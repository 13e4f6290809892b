"""Simulate nightly retraining on the offline replay: a first run, then one warm-started run per night with the
replay's clock (FINPIPE_REPLAY_AS_OF) advanced by one trading session, each promoted only by the strict rule.

    .venv/bin/python scripts/nightly_replay.py --lake /tmp/nightly --first 2013-02-25 --nights 3 --train-minutes 4

Every night runs ``finpipe run --warm-start`` (ingest the new session, statistics, datasets, an adapter continuing
from the champion's weights, evaluation on the frozen golden set, promotion). The table printed at the end (and
written as JSON and Markdown into the lake) shows, night by night, the challenger's and the champion's strict golden
metrics, whether the challenger was promoted and why, and the training tokens the champion has accumulated.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sessions_from(first: dt.date, count: int) -> list[dt.date]:
    import exchange_calendars as xcals

    calendar = xcals.get_calendar("XNYS", start=first - dt.timedelta(days=10))
    days = [d.date() for d in calendar.sessions_in_range(first, first + dt.timedelta(days=4 * count + 10))]
    return days[:count]


def night(lake: Path, as_of: dt.date, minutes: float, warm: bool, log: Path) -> dict:
    env = os.environ | {"FINPIPE_LAKE_DIR": str(lake), "FINPIPE_REPLAY_AS_OF": as_of.isoformat()}
    command = [sys.executable, "-m", "finpipe.cli", "run", "--train-minutes", str(minutes)]
    if warm:
        command.append("--warm-start")
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"the run for {as_of} failed (exit {code}): see {log}")
    return summarize(lake, as_of, round(time.perf_counter() - started))


def summarize(lake: Path, as_of: dt.date, seconds: int | None) -> dict:
    """The night's row, from the lake the run left (pointers resolved against the lake)."""
    sys.path.insert(0, str(REPO))
    from finpipe.models import registry

    latest = registry.read_pointer(registry.latest_adapter_pointer(lake))
    champion = registry.read_pointer(registry.champion_pointer(lake))
    evaluation = json.loads((Path(latest["path"]) / "evaluation/evaluation.json").read_text())
    training = json.loads((Path(latest["path"]) / "training_report.json").read_text())
    sys.path.insert(0, str(REPO))
    from finpipe.evaluation.promotion import decide  # the rule promotion applied, for its reason in words

    v = evaluation["variants"]
    decision = decide(v["adapter"], v["base"], v["champion"], evaluation["spec"]["regression_tolerance"],
                      evaluation["same_base_as_champion"], evaluation["spec"]["forgetting_tolerance"])
    golden = lambda name: ((evaluation["variants"].get(name) or {}).get("golden") or {}).get("overall", {})  # noqa
    return {"as_of": as_of.isoformat(), "seconds": seconds, "challenger_run": latest["run_id"],
            "promoted": champion["run_id"] == latest["run_id"], "reason": decision.reason,
            "champion_after": champion["run_id"], "warm_start": training.get("warm_start"),
            "challenger_tokens_cumulative": training.get("cumulative_train_tokens"),
            "challenger": {k: golden("adapter").get(k) for k in ("number_correctness", "label_correctness",
                                                                  "exact_match", "format_validity")},
            "champion_before": {k: golden("champion").get(k) for k in ("number_correctness", "label_correctness",
                                                                       "exact_match", "format_validity")}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lake", type=Path, required=True, help="a lake folder of its own (created)")
    p.add_argument("--first", type=dt.date.fromisoformat, default=dt.date(2013, 2, 25), help="the first night")
    p.add_argument("--nights", type=int, default=3, help="warm-started nights after the first run")
    p.add_argument("--train-minutes", type=float, default=4.0)
    args = p.parse_args(argv)
    args.lake.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, as_of in enumerate(sessions_from(args.first, args.nights + 1)):
        print(f"night {i}: as of {as_of}{' (warm start from the champion)' if i else ' (first run)'}", flush=True)
        done = args.lake / f"night-{i}.json"  # a finished night is not run again: rerun the script to resume
        if done.exists():
            rows.append(json.loads(done.read_text()))
        else:
            rows.append(night(args.lake, as_of, args.train_minutes, warm=i > 0, log=args.lake / f"night-{i}.log"))
            done.write_text(json.dumps(rows[-1], indent=2))
        r = rows[-1]
        print(f"  challenger {r['challenger_run']} -> {'promoted' if r['promoted'] else 'kept the champion'} "
              f"({r['reason']}); strict golden {r['challenger']}", flush=True)
    lines = ["| night | as of | challenger numbers / labels / exact | champion before | promoted | reason | "
             "challenger's cumulative tokens |", "|---|---|---|---|---|---|---|"]
    fmt = lambda m: " / ".join("–" if m.get(k) is None else f"{m[k]:.3f}"  # noqa: E731
                               for k in ("number_correctness", "label_correctness", "exact_match"))
    for i, r in enumerate(rows):
        lines.append(f"| {i} | {r['as_of']} | {fmt(r['challenger'])} | {fmt(r['champion_before'])} | "
                     f"{'yes' if r['promoted'] else 'no'} | {r['reason']} | {r['challenger_tokens_cumulative']:,} |")
    table = "\n".join(lines)
    (args.lake / "nightly_replay.json").write_text(json.dumps(rows, indent=2))
    (args.lake / "nightly_replay.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
