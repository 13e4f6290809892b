"""A cold ``finpipe ask``, end to end: a new process per question, as a user types it, timed from the shell.

    python -m benchmarks.cold_ask [--runs 3] [--baseline REV] [--question Q] [--json PATH]

Each run is ``finpipe ask Q --server off --timings`` in a fresh process against the lake (FINPIPE_LAKE_DIR or
data_lake/) and its champion: the wall time from the shell, and finpipe's own breakdown (start-up, lake and
grounding, torch import, weights, prefill, decode; the rest of the wall time is the interpreter's start and exit).
``--baseline REV`` also runs the same command from a git worktree of REV (e.g. the commit before a change) with the
same virtual environment, interleaved run by run with the current tree, so both are measured in one run on one
machine; the baseline gets its own copy of the lake's pointers so its merged-weights cache never touches ours.
One warm-up run of each fills the page cache and the merged-weights caches; it is not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common

NAME = "cold_ask"
QUESTION = "How volatile is AAPL right now?"
ROOT = Path(__file__).resolve().parents[1]


def _lake_copy(lake: Path, into: Path) -> Path:
    """The lake file, its model pointers and folders: everything ``ask`` reads but the merged-weights cache."""
    into.mkdir(parents=True)
    shutil.copy2(lake / "finpipe.duckdb", into / "finpipe.duckdb")
    for kind in ("adapters", "base"):  # copies: pointers that lead out of their lake are refused
        (into / "models" / kind).mkdir(parents=True)
        for entry in (lake / "models" / kind).iterdir():
            target = into / "models" / kind / entry.name
            if entry.is_dir() and not entry.name.startswith("_"):
                shutil.copytree(entry, target)
            elif entry.suffix == ".json":
                shutil.copy2(entry, target)
    return into


def _run(tree: Path, lake: Path, question: str, timings: bool) -> dict[str, Any]:
    env = os.environ | {"FINPIPE_LAKE_DIR": str(lake), "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    command = [sys.executable, "-m", "finpipe.cli", "ask", question, "--server", "off"] + (["--timings"] * timings)
    done = subprocess.run(command,
                          cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"finpipe ask failed in {tree} ({done.returncode}):\n{done.stderr[-2000:]}")
    row: dict[str, Any] = {"wall_s": round(wall, 3), "answer": done.stdout.strip()}
    if timings := re.search(r"timings: (.*); ([\d.]+) s since finpipe started", done.stderr):
        for name, seconds in re.findall(r"([a-z][a-z -]+?) ([\d.]+) s", timings.group(1)):
            row[name.strip()] = float(seconds)
        row["interpreter start and exit"] = round(wall - float(timings.group(2)), 3)
    elif generated := re.search(r"(\d+) tokens in ([\d.]+) s", done.stderr):
        row["generation"] = float(generated.group(2))
    if tokens := re.search(r"(\d+) tokens in", done.stderr):
        row["tokens"] = int(tokens.group(1))
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", metavar="REV", help="also run this git revision's `finpipe ask`, interleaved")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from finpipe.paths import lake_dir

    lake = lake_dir()
    result: dict[str, Any] = {"machine": _common.machine(torch_needed=False), "question": args.question,
                              "runs": args.runs}
    trees = {"current": (ROOT, lake, True)}
    with tempfile.TemporaryDirectory(prefix="finpipe-cold-ask-") as tmp, contextlib.ExitStack() as stack:
        if args.baseline:
            worktree = stack.enter_context(_common.baseline_worktree(args.baseline, Path(tmp) / "baseline"))
            # a revision before `--timings` existed: wall time and its own generation time only
            trees[f"baseline {args.baseline}"] = (worktree, _lake_copy(lake, Path(tmp) / "baseline_lake"), False)
        for tree, tree_lake, timed in trees.values():
            _run(tree, tree_lake, args.question, timed)  # warm-up: page cache, merged weights
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for _ in range(args.runs):
            for name, (tree, tree_lake, timed) in trees.items():
                rows[name].append(_run(tree, tree_lake, args.question, timed))
    summary = []
    for name, runs in rows.items():
        keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float)) and k != "tokens"]
        summary.append({"tree": name, "tokens": runs[0].get("tokens"), "same_answer": len({r["answer"] for r in runs}) == 1}
                       | {k: statistics.median(r[k] for r in runs if k in r) for k in keys}
                       | {"best wall_s": min(r["wall_s"] for r in runs)})
    result |= {"rows": rows, "summary": summary,
               "answers_identical_across_trees": len({r["answer"] for runs in rows.values() for r in runs}) == 1}
    columns = list(dict.fromkeys(k for row in summary for k in row))
    table = _common.format_table(summary, columns) + "\n(median of the runs; best wall_s is the fastest run)"
    return _common.finish(NAME, result, args.json, table)


if __name__ == "__main__":
    main()
