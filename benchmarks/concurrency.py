"""Two finpipe processes on the same cores: with finpipe's thread sharing vs each taking every core (what torch
does by default, and what finpipe did before).

    python -m benchmarks.concurrency [--quick] [--json PATH] [--answers 6] [--max-new-tokens 32]

The workload is one finpipe process generating answers greedily with the lake's base model (a tiny random Llama
without one): ``finpipe.evaluation.generation`` (which claims the process's share of the cores), one answer at a
time. Measured: one process alone; two at once sharing the cores (``finpipe.runtime.claim_cpu_share``: each
takes cores / live processes); two at once each forced to every core (``FINPIPE_THREADS`` = the core count).
The goal: two shared processes finish in about the time of running them one after the other, not 5-30x slower.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common
from finpipe.models.tiny import tiny_llama

NAME = "concurrency"

WORKER = r"""
import json, sys, time
from finpipe.evaluation.generation import Sampling, generate, load_chat_model
from finpipe.runtime import rebalance
base, answers, tokens, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model, tokenizer = load_chat_model(base)
chat = [{"role": "user", "content": "Summarize what a stock index is in two sentences."}]
generate(model, tokenizer, chat, Sampling(max_new_tokens=2))
started = time.perf_counter()
for _ in range(answers):
    rebalance()
    generate(model, tokenizer, chat, Sampling(max_new_tokens=tokens))
json.dump({"seconds": time.perf_counter() - started, "threads": rebalance(force=True)}, open(out, "w"))
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model, 2 answers x 8 tokens")
    p.add_argument("--json", help=f"results file (default benchmarks/results/{NAME}.json)")
    p.add_argument("--answers", type=int, help="answers per process (default 6; quick 2)")
    p.add_argument("--max-new-tokens", type=int, help="default 32; quick 8")
    args = p.parse_args(argv)
    args.answers = args.answers or (2 if args.quick else 6)
    args.max_new_tokens = args.max_new_tokens or (8 if args.quick else 32)
    return args


def _spawn(base: Path, args, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(base), str(args.answers), str(args.max_new_tokens),
                             str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _run(base: Path, args, workdir: Path, name: str, processes: int, forced_threads: int | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "FINPIPE_THREADS"}
    if forced_threads:
        env["FINPIPE_THREADS"] = str(forced_threads)
    outs = [workdir / f"{name}-{i}.json" for i in range(processes)]
    started = time.perf_counter()
    procs = [_spawn(base, args, out, env) for out in outs]
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: a worker failed: {err.decode()[-2000:]}")
    wall = time.perf_counter() - started
    results = [json.loads(out.read_text()) for out in outs]
    return {"variant": name, "processes": processes, "wall_s": wall,
            "generation_s": max(r["seconds"] for r in results), "threads_each": [r["threads"] for r in results]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from finpipe.runtime import usable_cores

    cores = usable_cores()
    machine = _common.machine(torch_needed=False)
    with tempfile.TemporaryDirectory(prefix="finpipe-bench-concurrency-") as tmp:
        workdir = Path(tmp)
        base = None if args.quick else _common.lake_base_model()
        note = f"lake base {base.name}" if base else "tiny random Llama (2 layers, hidden 64)"
        if base is None:
            train, _ = _common.builtin_split(date_stride=9)
            base = tiny_llama(workdir / "tiny", _common.sample_texts(train))
        rows = [_run(base, args, workdir, "one_process", 1, None),
                _run(base, args, workdir, "two_shared", 2, None),
                _run(base, args, workdir, "two_each_all_cores", 2, cores)]
    alone = rows[0]["generation_s"]
    for r in rows:
        r["vs_two_in_sequence"] = r["generation_s"] / (2 * alone) if r["processes"] == 2 else None
    result = {"benchmark": NAME, "machine": machine,
              "config": {"quick": args.quick, "model": note, "answers": args.answers,
                         "max_new_tokens": args.max_new_tokens, "cores": cores},
              "rows": rows,
              "ratios": {"two_shared_vs_two_in_sequence": round(rows[1]["vs_two_in_sequence"], 3),
                         "two_each_all_cores_vs_two_in_sequence": round(rows[2]["vs_two_in_sequence"], 3)},
              "goal": "two shared processes take about the time of two in sequence (ratio ~1), far below the "
                      "oversubscribed ratio"}
    columns = ["variant", "processes", "threads_each", "generation_s", "wall_s", "vs_two_in_sequence"]
    table = _common.format_table(rows, columns)
    table += "\nvs_two_in_sequence: the slower process's generation time / (2 x one process alone)"
    return _common.finish(NAME, result, args.json, table)


if __name__ == "__main__":
    main()
