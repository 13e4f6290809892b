"""The Quickstart's resident memory, step by step: which Dagster step reaches the peak, and how high.

    python -m benchmarks.quickstart_memory [--json PATH] [-- finpipe run options...]

Runs ``finpipe run`` (the Quickstart's first command; extra options after ``--``) in a fresh temporary lake and
samples the resident memory of its whole process tree every 0.2 s (``/proc``), then reads the run's own Dagster
event log (the steps' start and end times) and reports each step's peak: the largest sampled total while that
step ran. Steps of one ``dg.materialize`` run in one process, so a step's peak includes what earlier steps left
resident; the table also shows the total when each step started. The overall peak is checked against
``/proc``'s own high-water mark of the ``finpipe run`` process (VmHWM), which no sampler can miss.
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


def _hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def sample(process: subprocess.Popen) -> tuple[list[tuple[float, float]], float | None]:
    """(time, MB of the process tree) samples until ``process`` exits, and its own high-water mark."""
    samples: list[tuple[float, float]] = []
    hwm: list[float] = []
    while process.poll() is None:
        samples.append((time.time(), sum(_rss_mb(p) for p in _tree(process.pid))))
        if (mark := _hwm_mb(process.pid)) is not None:
            hwm.append(mark)
        time.sleep(SAMPLE_EVERY_S)
    return samples, max(hwm) if hwm else None


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


def per_step(samples: list[tuple[float, float]], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for step in steps:
        inside = [mb for t, mb in samples if step["start"] <= t <= step["end"]]
        before = [mb for t, mb in samples if t <= step["start"]]
        rows.append({"step": step["step"], "seconds": round(step["end"] - step["start"], 1),
                     "rss_at_start_mb": round(before[-1]) if before else None,
                     "peak_mb": round(max(inside)) if inside else None})
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
    peak = max(mb for _, mb in samples)
    result |= {"command": " ".join(["finpipe", "run", *args.run_options]), "wall_s": round(time.time() - started),
               "peak_mb_sampled": round(peak), "peak_mb_hwm": round(holder["hwm"] or 0), "steps": rows}
    table = _common.format_table(rows, ["step", "seconds", "rss_at_start_mb", "peak_mb"])
    table += (f"\nwhole run: {result['wall_s']} s; peak {result['peak_mb_sampled']} MB sampled, "
              f"{result['peak_mb_hwm']} MB high-water mark of the finpipe process")
    return _common.finish(NAME, result, args.json, table)


if __name__ == "__main__":
    main()
