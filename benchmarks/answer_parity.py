"""The lean decoder (``ask``'s and ``serve``'s on a CPU) against a baseline revision's: the same answers, faster?

    python -m benchmarks.answer_parity --baseline REV [--limit N] [--json PATH]

Every distinct prompt of the lake's end-to-end set (its golden questions and the wild ones, grounded through the
answering path as ``ask`` grounds them; refused questions need no model) is answered greedily, 96 new tokens at
most, by the champion's merged folder with int8 decode steps: once by this tree's ``finpipe.inference.lean`` and
once by REV's (a git worktree), each in its own process, one after the other. Reported: how many answers are the
same text, the differing pairs, each tree's tokens/s over the whole set (prefill included), and each tree's answers
scored end to end as ``finpipe evaluate`` scores them (``finpipe.evaluation.end_to_end``: strict metrics and the
verifier's verdict per part), so a change of decoder is judged by what users get. Needs a lake with a champion
merged (``finpipe run``, or one ``finpipe ask``).
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

NAME = "answer_parity"
ROOT = Path(__file__).resolve().parents[1]


def dump(out: Path, limit: int | None) -> None:
    """Answer the set with the ``finpipe`` on ``sys.path`` (this tree or the baseline's), score it end to end and
    write the texts and the scores."""
    from finpipe import paths
    from finpipe.evaluation.end_to_end import EndToEndSet, build_set, evaluate_end_to_end, prompt_key
    from finpipe.evaluation.generation import Sampling
    from finpipe.inference.answering import prepare
    from finpipe.inference.lean import LeanChatModel
    from finpipe.instructions.samples import read_jsonl
    from finpipe.market.lake import PriceLake
    from finpipe.models import merged, registry

    lake = paths.lake_dir()
    champion = registry.read_pointer(registry.champion_pointer(lake), required=registry.ADAPTER_POINTER_FIELDS)
    folder = merged.cached_any(lake, champion["run_id"], Path(champion["base"]["path"]), Path(champion["path"]))
    if folder is None:
        raise SystemExit(f"the champion {champion['run_id']} is not merged yet: run one `finpipe ask` first")
    questions = build_set(read_jsonl(paths.DatasetFiles.of(lake).golden), PriceLake(paths.lake_db_path()))
    keys = []  # each question's prompt key (None: refused, no model)
    for q in questions.questions:
        prepared = prepare(q.question, questions.facts_for(q.as_of))
        keys.append(None if prepared.refusal is not None else prompt_key(prepared.messages))
    chosen = set(list(dict.fromkeys(k for k in keys if k is not None))[:limit])
    asked = EndToEndSet([q for q, k in zip(questions.questions, keys) if k is None or k in chosen], questions.facts_for)
    chat = LeanChatModel(folder, int8=True)
    texts, counts = {}, {"tokens": 0, "seconds": 0.0}

    def generate_many(chats: list[list[dict[str, str]]]) -> list:
        chat.generate(chats[0], Sampling(max_new_tokens=4))  # warm-up
        answers, started = [], time.perf_counter()
        for messages in chats:
            answers.append(generated := chat.generate(messages, Sampling()))
            texts[prompt_key(messages)], counts["tokens"] = generated.text, counts["tokens"] + generated.new_tokens
        counts["seconds"] = time.perf_counter() - started
        return answers

    scores = evaluate_end_to_end(asked, generate_many)
    out.write_text(json.dumps({"champion": champion["run_id"], "texts": texts, **counts,
                               "end_to_end": scores["summary"]["parts"]}))


def _run_tree(tree: Path, out: Path, limit: int | None) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--dump", str(out)] + (["--limit", str(limit)] * bool(limit))
    from finpipe.paths import lake_dir

    env = os.environ | {"PYTHONPATH": str(tree), "FINPIPE_LAKE_DIR": str(lake_dir().resolve())}  # one lake for both
    subprocess.run(command, cwd=tree, env=env, check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, metavar="REV", help="the git revision to compare with")
    parser.add_argument("--limit", type=int, help="answer only the first N prompts")
    parser.add_argument("--json", help=f"results file (default benchmarks/results/{NAME}.json)")
    args = parser.parse_args(argv)
    from benchmarks import _common

    machine = _common.machine(torch_needed=False)
    with tempfile.TemporaryDirectory(prefix="finpipe-bench-parity-") as tmp:
        with _common.baseline_worktree(args.baseline, Path(tmp) / "baseline") as worktree:
            current = _run_tree(ROOT, Path(tmp) / "current.json", args.limit)
            baseline = _run_tree(worktree, Path(tmp) / "baseline.json", args.limit)
    differing = [{"baseline": baseline["texts"][k], "current": text} for k, text in current["texts"].items()
                 if baseline["texts"].get(k) != text]
    trees = (("current", current), (f"baseline {args.baseline}", baseline))
    rows = [{"tree": name, "answers": len(r["texts"]), "tokens": r["tokens"], "seconds": round(r["seconds"], 1),
             "tokens_per_s": round(r["tokens"] / r["seconds"], 1)} for name, r in trees]
    quality = [{"tree": name, "part": part, "n": got["n"]} | got["means"]
               for name, r in trees for part, got in r["end_to_end"].items()]
    result = {"benchmark": NAME, "machine": machine, "champion": current["champion"], "rows": rows,
              "end_to_end": quality, "same_text": len(current["texts"]) - len(differing),
              "answers": len(current["texts"]),
              "speedup": round(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"], 3), "differing": differing}
    table = _common.format_table(rows, ["tree", "answers", "tokens", "seconds", "tokens_per_s"])
    table += "\n\nend to end, scored as the evaluation scores them:\n" + _common.format_table(
        quality, ["tree", "part", "n", "number_correctness", "label_correctness", "exact_match", "verified",
                  "refusal_correctness"])
    table += f"\nsame text: {result['same_text']} / {result['answers']}; speed-up {result['speedup']}x"
    for pair in differing:
        table += f"\n  baseline: {pair['baseline']}\n  current:  {pair['current']}"
    return _common.finish(NAME, result, args.json, table)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--dump":
        limit = int(sys.argv[sys.argv.index("--limit") + 1]) if "--limit" in sys.argv else None
        dump(Path(sys.argv[2]), limit)
    else:
        main()
