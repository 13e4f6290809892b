"""`finpipe serve` per engine (PyTorch, llama.cpp) against generating the same answers in-process, on the lake's
champion: tokens/s per client and aggregate at 1 and 4 concurrent clients, and what serving adds to each request.

    python -m benchmarks.serving [--json PATH] [--questions 8] [--max-new-tokens 48] [--gguf FILE]
                                 [--engines torch,llama.cpp]

Needs a lake with a champion (FINPIPE_LAKE_DIR, default data_lake/). The llama.cpp rows need llama-cpp-python and a
GGUF of the champion: ``--gguf FILE``, else the export ``finpipe export --gguf DIR`` recorded in the lake.

The questions are grounded through the answering path (``finpipe.inference.answering.prepare``) once, in this
process; every variant answers the same chats greedily with at most ``--max-new-tokens`` tokens:

    in_process_torch   the baseline for PyTorch: the champion loaded as ``finpipe serve`` loads it (its
                       ``ModelStore``: on a CPU the lean decoder on the merged folder with int8 decode steps, else
                       transformers; the same precision: FINPIPE_CPU_BF16 is passed to the server), one answer at a time
    raw_llama_cpp      the baseline for llama.cpp: ``llama_cpp.Llama`` on the same GGUF, fed the same prompt token ids
                       (finpipe's tokenizer), ``create_completion`` greedy
    served_<engine>_<n>_client(s)  a real ``finpipe serve --engine <engine>`` on a free loopback port, the questions
                       sent over HTTP by 1 client (one after the other) and by 4 concurrent clients

Per served row: requests/s, tokens/s aggregate (all completion tokens / elapsed) and per client (each request's
tokens / its wall time, averaged), and the **per-request overhead**: the client's wall time minus the time the server
reports it spent generating the answer and queued (``finpipe.timing``: its ``generation_s`` and ``queued_s``), i.e.
HTTP, JSON, grounding, verification and the queue's hand-offs. ``same_text`` counts answers identical to the
baseline's (greedy: the same engine gives the same text; only transformers batches concurrent clients, which may change a few).
The baselines run first, alone, then this process gives its core share back and only waits on the servers.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import _common
from finpipe import runtime

NAME = "serving"
ENGINES = ("torch", "llama.cpp")
#: question forms a person types, over the lake's tickers (each names one family, all grounded)
FORMS = ("What is {t}'s trend?", "How volatile is {t} right now?", "Is {t} overbought or oversold?",
         "How far is {t} from its 52-week high?", "How did {t} do over the last 5 days?", "What did {t} close at?")
START_TIMEOUT_S = 300


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    p.add_argument("--json", help=f"results file (default benchmarks/results/{NAME}.json)")
    p.add_argument("--questions", type=int, default=8, help="questions per measurement (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit (default 48)")
    p.add_argument("--gguf", help="the champion's GGUF file for the llama.cpp rows (default: its recorded export)")
    p.add_argument("--engines", default=",".join(ENGINES), help="engines to serve with (default torch,llama.cpp)")
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := [e for e in args.engines if e not in ENGINES]:
        p.error(f"unknown engines {unknown}: choose among {', '.join(ENGINES)}")
    if args.questions < 1 or args.max_new_tokens < 1:
        p.error("--questions and --max-new-tokens must be >= 1")
    return args


def champion() -> tuple[Path, dict]:
    from finpipe.models import registry
    from finpipe.paths import LAKE_DB_NAME, lake_dir

    lake = lake_dir()
    if not (lake / LAKE_DB_NAME).exists():
        raise SystemExit(f"no lake at {lake}: run `finpipe run` first (or set FINPIPE_LAKE_DIR)")
    try:
        return lake, registry.read_pointer(registry.champion_pointer(lake), required=registry.ADAPTER_POINTER_FIELDS)
    except FileNotFoundError:
        raise SystemExit(f"the lake {lake} has no champion: run `finpipe run` first") from None


def grounded_chats(lake: Path, count: int) -> list[tuple[str, list[dict]]]:
    """``count`` (question, chat) pairs, grounded in the lake as the server grounds them."""
    from finpipe.inference.answering import prepare
    from finpipe.inference.context import LakeFacts
    from finpipe.market.lake import PriceLake
    from finpipe.paths import LAKE_DB_NAME

    facts = LakeFacts(PriceLake(lake / LAKE_DB_NAME))
    tickers = facts.tickers()
    out = []
    for i in range(count * 3):
        question = FORMS[i % len(FORMS)].format(t=tickers[(i // len(FORMS) + i) % len(tickers)])
        prepared = prepare(question, facts)
        if prepared.refusal is None:
            out.append((question, prepared.messages))
        if len(out) == count:
            return out
    raise SystemExit(f"only {len(out)} of {count} questions could be grounded in {lake}")


def gguf_file(args, lake: Path, run_id: str) -> tuple[Path | None, str | None]:
    """(the GGUF for the llama.cpp rows, or None with why not)."""
    from finpipe.inference.exported import recorded_export
    from finpipe.serving import gguf_engine

    if "llama.cpp" not in args.engines:
        return None, "not asked for (--engines)"
    if not gguf_engine.available():
        return None, f"llama-cpp-python is not installed: {gguf_engine.INSTALL_HINT}"
    if args.gguf:
        return Path(args.gguf).resolve(), None
    try:
        record = recorded_export(lake, run_id)
    except (ValueError, FileNotFoundError) as exc:
        return None, str(exc)
    if record is None:
        return None, f"no GGUF export of the champion {run_id}: `finpipe export --gguf DIR` (or pass --gguf FILE)"
    return record.path, None


def in_process_torch(lake: Path, pointer: dict, chats, max_new_tokens: int, dtype) -> dict[str, Any]:
    """The champion loaded exactly as ``finpipe serve`` loads it (``ModelStore``: the lean decoder on the merged
    folder on a CPU, else transformers), answering one question at a time in this process."""
    from finpipe.evaluation.generation import DecodeSpec, Sampling, generate
    from finpipe.serving.models import ModelStore

    os.environ["FINPIPE_CPU_BF16"] = "1" if str(dtype) == "torch.bfloat16" else "0"  # as the servers are told
    started = time.perf_counter()
    store = ModelStore(lake, decode=DecodeSpec(), log=lambda line: print(f"  {line}", flush=True))
    loaded = store.load(pointer["run_id"], pointer["base"], pointer["path"])
    load_s = time.perf_counter() - started

    def answer(chat, sampling):
        if decoder == "lean":
            return model.generate(chat, sampling)
        return generate(model, tokenizer, chat, sampling)

    model, tokenizer, decoder = loaded.model, loaded.tokenizer, loaded.decoder
    answer(chats[0][1], Sampling(max_new_tokens=4))  # warm-up
    answers = [answer(chat, Sampling(max_new_tokens=max_new_tokens)) for _, chat in chats]
    precision = f"{loaded.precision}, {loaded.decoder} decoder"
    model = tokenizer = loaded = store = None
    runtime.release_memory()
    tokens, seconds = sum(a.new_tokens for a in answers), sum(a.seconds for a in answers)
    return {"variant": "in_process_torch", "engine": "torch", "precision": precision, "load_s": load_s,
            "requests": len(answers), "new_tokens": tokens, "gen_s": seconds,
            "tokens_per_s": tokens / seconds, "tokens_per_s_per_client": tokens / seconds,
            "texts": [a.text for a in answers]}


def raw_llama_cpp(gguf: Path, pointer: dict, chats, max_new_tokens: int) -> dict[str, Any]:
    import llama_cpp

    from finpipe.models.chat_template import IM_END
    from finpipe.models.safe_loading import load_tokenizer

    adapter = Path(pointer["path"])
    tokenizer = load_tokenizer(adapter if (adapter / "tokenizer_config.json").exists() else pointer["base"]["path"])
    started = time.perf_counter()
    threads = runtime.cpu_share()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=0, n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - started
    prompts = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for _, chat in chats]
    llm.create_completion(list(prompts[0]), max_tokens=4, temperature=0.0)  # warm-up
    texts, tokens, seconds = [], 0, 0.0
    for prompt in prompts:
        started = time.perf_counter()
        out = llm.create_completion(list(prompt), max_tokens=max_new_tokens, temperature=0.0, stop=[IM_END])
        seconds += time.perf_counter() - started
        texts.append(out["choices"][0]["text"].strip())
        tokens += out["usage"]["completion_tokens"]
    del llm
    return {"variant": "raw_llama_cpp", "engine": "llama.cpp", "precision": gguf.name, "load_s": load_s,
            "threads": threads, "requests": len(prompts), "new_tokens": tokens, "gen_s": seconds,
            "tokens_per_s": tokens / seconds, "tokens_per_s_per_client": tokens / seconds, "texts": texts}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine: str, gguf: Path | None, env: dict, log: Path) -> tuple[subprocess.Popen, str, dict]:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "finpipe.cli", "serve", "--port", str(port), "--engine", engine]
    if engine == "llama.cpp" and gguf is not None:
        command += ["--gguf", str(gguf)]
    proc = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"finpipe serve --engine {engine} exited: {log.read_text()[-2000:]}")
        try:
            health = httpx.get(f"{url}/health", timeout=5).json()
            if health.get("can_answer") and health.get("engine") == engine:
                return proc, url, health
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"finpipe serve --engine {engine} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)


def drive(url: str, chats, clients: int, max_new_tokens: int) -> tuple[list[dict], float]:
    """Each question once, over ``clients`` concurrent connections: per request its wall time, tokens, text and the
    server's timing; and the elapsed time of all of them."""
    import httpx

    def ask(question: str) -> dict:
        with httpx.Client(timeout=600) as client:
            started = time.perf_counter()
            reply = client.post(f"{url}/v1/chat/completions", json={
                "model": "champion", "max_tokens": max_new_tokens,
                "messages": [{"role": "user", "content": question}]})
            wall = time.perf_counter() - started
        body = reply.json()
        if reply.status_code != 200:
            raise RuntimeError(f"{question!r}: {reply.status_code} {body}")
        timing = body["finpipe"]["timing"]
        return {"wall_s": wall, "tokens": body["usage"]["completion_tokens"], "text": body["choices"][0]["message"][
            "content"], "generation_s": timing["generation_s"], "queued_s": timing["queued_s"],
            "server_s": timing["server_s"], "verdict": body["finpipe"]["verdict"]}

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(ask, [q for q, _ in chats]))
    return answers, time.perf_counter() - started


def served_rows(engine: str, gguf: Path | None, chats, max_new_tokens: int, env: dict, workdir: Path,
                baseline: dict | None) -> list[dict[str, Any]]:
    import httpx

    log = workdir / f"serve-{engine}.log"
    proc, url, health = start_server(engine, gguf, env, log)
    rows = []
    try:
        drive(url, chats[:1], 1, 4)  # warm-up
        for clients in (1, 4):
            answers, elapsed = drive(url, chats, clients, max_new_tokens)
            tokens = sum(a["tokens"] for a in answers)
            overhead = [a["wall_s"] - a["generation_s"] - a["queued_s"] for a in answers]
            generating = sum(a["generation_s"] for a in answers)
            texts = [a["text"] for a in answers]
            rows.append({
                "variant": f"served_{engine}_{clients}_client{'s' if clients > 1 else ''}", "engine": engine,
                "precision": health.get("precision"), "clients": clients, "requests": len(answers),
                "new_tokens": tokens, "seconds": elapsed, "requests_per_s": len(answers) / elapsed,
                "tokens_per_s": tokens / elapsed,
                "tokens_per_s_per_client": statistics.mean(a["tokens"] / a["wall_s"] for a in answers),
                "server_generation_tokens_per_s": tokens / generating if generating else None,
                "overhead_ms_median": 1000 * statistics.median(overhead), "overhead_ms_mean": 1000 *
                statistics.mean(overhead), "overhead_ms_max": 1000 * max(overhead),
                "same_text": sum(a == b for a, b in zip(texts, baseline["texts"])) if baseline else None,
                "verdicts": {v: sum(a["verdict"] == v for a in answers) for v in {a["verdict"] for a in answers}},
                "texts": texts})
        rows[-1]["batches"] = httpx.get(f"{url}/health").json()["batches"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    request_lines = [line for line in log.read_text().splitlines() if "POST /v1/chat/completions" in line]
    rows[0]["server_log_example"] = request_lines[1] if len(request_lines) > 1 else None
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with _common.quiet_session():
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from finpipe.runtime import accelerator, claim_cpu_share, inference_dtype, release_cpu_share

    machine = _common.machine()
    lake, pointer = champion()
    chats = grounded_chats(lake, args.questions)
    gguf, gguf_skipped = gguf_file(args, lake, pointer["run_id"])
    claim_cpu_share()
    dtype = inference_dtype(accelerator())  # decided once here, handed to the servers: both sides compute alike
    print(f"champion {pointer['run_id']}, {len(chats)} questions, greedy, max_new_tokens {args.max_new_tokens}; "
          f"PyTorch precision {dtype}", flush=True)
    rows, baselines = [], {}
    if "torch" in args.engines:
        print("in-process PyTorch ...", flush=True)
        baselines["torch"] = in_process_torch(lake, pointer, chats, args.max_new_tokens, dtype)
        rows.append(baselines["torch"])
    if gguf is not None:
        print(f"raw llama.cpp on {gguf} ...", flush=True)
        baselines["llama.cpp"] = raw_llama_cpp(gguf, pointer, chats, args.max_new_tokens)
        rows.append(baselines["llama.cpp"])
    else:
        rows.append({"variant": "raw_llama_cpp", "skipped": gguf_skipped})
    release_cpu_share()  # this process only waits on the servers from now on: the cores are theirs
    env = os.environ | {"FINPIPE_CPU_BF16": "1" if str(dtype) == "torch.bfloat16" else "0"}
    with tempfile.TemporaryDirectory(prefix="finpipe-bench-serving-") as tmp:
        for engine in args.engines:
            if engine == "llama.cpp" and gguf is None:
                rows.append({"variant": "served_llama.cpp", "skipped": gguf_skipped})
                continue
            print(f"finpipe serve --engine {engine} at 1 and 4 clients ...", flush=True)
            rows += served_rows(engine, gguf, chats, args.max_new_tokens, env, Path(tmp), baselines.get(engine))

    ratios = {}
    for engine, baseline in baselines.items():
        for r in rows:
            if r.get("engine") == engine and r.get("clients") and r.get("tokens_per_s"):
                ratios[f"{r['variant']}_vs_{baseline['variant']}_tokens_per_s_per_client"] = round(
                    r["tokens_per_s_per_client"] / baseline["tokens_per_s"], 3)
    served = {r["variant"]: r for r in rows if r.get("clients")}
    if "raw_llama_cpp" in {b["variant"] for b in baselines.values()}:  # the yardstick for both engines
        raw = baselines["llama.cpp"]["tokens_per_s"]
        for variant in ("served_torch_1_client", "served_llama.cpp_1_client"):
            if variant in served:
                ratios[f"{variant}_vs_raw_llama_cpp_tokens_per_s"] = round(
                    served[variant]["tokens_per_s_per_client"] / raw, 3)
    if "served_llama.cpp_1_client" in served and "served_torch_1_client" in served:
        ratios["served_llama.cpp_vs_served_torch_1_client_tokens_per_s"] = round(
            served["served_llama.cpp_1_client"]["tokens_per_s"] / served["served_torch_1_client"]["tokens_per_s"], 3)
    result = {
        "benchmark": NAME, "machine": machine,
        "config": {"lake": str(lake), "champion": pointer["run_id"], "questions": len(chats),
                   "max_new_tokens": args.max_new_tokens, "gguf": str(gguf) if gguf else None,
                   "torch_precision": str(dtype).removeprefix("torch."), "decoding": "greedy",
                   "overhead": "client wall time - server generation_s - server queued_s (finpipe.timing)"},
        "rows": rows, "ratios": ratios,
    }
    columns = ["variant", "precision", "requests", "new_tokens", "tokens_per_s", "tokens_per_s_per_client",
               "server_generation_tokens_per_s", "requests_per_s", "overhead_ms_median", "overhead_ms_max",
               "same_text", "skipped"]
    table = _common.format_table(rows, columns)
    table += "\n" + "\n".join(f"{k}: {v}" for k, v in ratios.items())
    example = next((r.get("server_log_example") for r in rows if r.get("server_log_example")), None)
    if example:
        table += f"\nserver log line: {example}"
    return _common.finish(NAME, result, args.json, table)


if __name__ == "__main__":
    main()
