"""The Quickstart's resident memory, step by step: which Dagster step reaches the peak, and how high.

    python -m benchmarks.quickstart_memory [--json PATH] [-- finpipe run options...]

Runs ``finpipe run`` (the Quickstart's first command; extra options after ``--``) in a fresh temporary lake and
samples the memory of its whole process tree every 0.2 s (``/proc``), then reads the run's own Dagster event log
(the steps' start and end times) and reports each step's peak: the largest sampled total while that step ran. The
data stages run in the ``finpipe run`` process, so a step's peak there includes what earlier steps left resident; the
model stage's steps each run in a process of their own (a forkserver's children). The tree's total is given as
resident memory (RSS: pages shared between the forkserver and its children count once per process, an upper bound)
and as proportional set size (PSS: each shared page split between its sharers, what the tree really holds). The
largest single process's high-water mark (VmHWM, which no sampler can miss) is what ``/usr/bin/time -v`` reports as
"Maximum resident set size".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import _common

NAME = "quickstart_memory"
SAMPLE_EVERY_S = 0.2


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _field_mb(path: str, field: str) -> float | None:
    """A ``/proc`` file's ``field:`` line (in kB) in MB; None when the process is gone."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _hwm_mb(pid: int) -> float | None:
    return _field_mb(f"/proc/{pid}/status", "VmHWM")


def _pss_mb(pid: int) -> float:
    return _field_mb(f"/proc/{pid}/smaps_rollup", "Pss") or 0.0


def sample(process: subprocess.Popen) -> tuple[list[tuple[float, float, float]], float | None]:
    """(time, RSS MB of the process tree, PSS MB of the tree) samples until ``process`` exits, and the largest
    high-water mark of any one process of the tree."""
    samples: list[tuple[float, float, float]] = []
    hwm: dict[int, float] = {}
    while process.poll() is None:
        tree = _tree(process.pid)
        samples.append((time.time(), sum(_rss_mb(p) for p in tree), sum(_pss_mb(p) for p in tree)))
        for pid in tree:
            if (mark := _hwm_mb(pid)) is not None:
                hwm[pid] = max(mark, hwm.get(pid, 0.0))
        time.sleep(SAMPLE_EVERY_S)
    return samples, max(hwm.values()) if hwm else None


def step_windows(dagster_home: Path) -> list[dict[str, Any]]:
    """Each step of every run in ``dagster_home``: key, start and end time, in order."""
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(dagster_home))
    steps: dict[tuple[str, str], dict[str, Any]] = {}
    for run in reversed(instance.get_runs()):
        for record in instance.all_logs(run.run_id):
            event = record.dagster_event
            if event is None or not record.step_key:
                continue
            key = (run.run_id, record.step_key)
            if event.event_type_value == "STEP_START":
                steps[key] = {"step": record.step_key, "start": record.timestamp, "end": None}
            elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE") and key in steps:
                steps[key]["end"] = record.timestamp
    return sorted((s for s in steps.values() if s["end"] is not None), key=lambda s: s["start"])


def per_step(samples: list[tuple[float, float, float]], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for step in steps:
        inside = [(rss, pss) for t, rss, pss in samples if step["start"] <= t <= step["end"]]
        before = [rss for t, rss, _ in samples if t <= step["start"]]
        rows.append({"step": step["step"], "seconds": round(step["end"] - step["start"], 1),
                     "rss_at_start_mb": round(before[-1]) if before else None,
                     "peak_mb": round(max(r for r, _ in inside)) if inside else None,
                     "peak_pss_mb": round(max(p for _, p in inside)) if inside else None})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--lake", help="run into this (new) lake folder and keep it, with run.log beside it (default: "
                        "a temporary folder)")
    parser.add_argument("run_options", nargs="*", help="options for `finpipe run` (after --)")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"machine": _common.machine(torch_needed=False)}
    with tempfile.TemporaryDirectory(prefix="finpipe-memory-") as tmp:
        if args.lake:
            if Path(args.lake).exists():
                raise SystemExit(f"--lake {args.lake} exists: give a new folder")
        lake = Path(args.lake).resolve() if args.lake else Path(tmp) / "lake"
        env = os.environ | {"FINPIPE_LAKE_DIR": str(lake), "DAGSTER_HOME": str(lake / "dagster_home"),
                            "DAGSTER_DISABLE_TELEMETRY": "1"}
        command = [str(Path(sys.executable).with_name("finpipe")), "run", *args.run_options]
        started = time.time()
        log_path = lake.with_name(lake.name + ".run.log")
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            holder: dict[str, Any] = {}
            thread = threading.Thread(target=lambda: holder.update(zip(("samples", "hwm"), sample(process))))
            thread.start()
            process.wait()
            thread.join()
        if process.returncode != 0:
            raise SystemExit(f"finpipe run failed ({process.returncode}):\n"
                             + log_path.read_text()[-3000:])
        samples = holder["samples"]
        rows = per_step(samples, step_windows(lake / "dagster_home"))
    result |= {"command": " ".join(["finpipe", "run", *args.run_options]), "wall_s": round(time.time() - started),
               "peak_mb_sampled": round(max(rss for _, rss, _ in samples)),
               "peak_pss_mb_sampled": round(max(pss for _, _, pss in samples)),
               "peak_mb_largest_process_hwm": round(holder["hwm"] or 0), "steps": rows}
    table = _common.format_table(rows, ["step", "seconds", "rss_at_start_mb", "peak_mb", "peak_pss_mb"])
    table += (f"\nwhole run: {result['wall_s']} s; the process tree's peak {result['peak_mb_sampled']} MB RSS, "
              f"{result['peak_pss_mb_sampled']} MB PSS (sampled); the largest process's high-water mark "
              f"{result['peak_mb_largest_process_hwm']} MB")
    return _common.finish(NAME, result, args.json, table)


if __name__ == "__main__":
    main()
