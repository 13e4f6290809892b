"""Inference speed: today's baseline (merged fp32) vs finpipe's CPU default (merged bf16 where the CPU has it), the
static KV cache, torch.compile, a 4-bit base, the served path, and the GGUF through llama.cpp when installed.

    python -m benchmarks.inference [--quick] [--json PATH] [--model smollm2|tiny] [--prompts 6] [--max-new-tokens 48]
                                   [--skip-nf4] [--skip-compile] [--served]

Every in-process variant answers the same chat prompts (system + user turns of the dataset's validation samples) one
at a time through ``finpipe.evaluation.generation.generate`` (chat template, greedy, KV cache, stop at end of turn),
same ``Sampling(max_new_tokens=...)``, after one untimed warm-up generation. Variants:

    merged_fp32        the baseline: the adapter merged, fp32 weights (what ``finpipe ask`` served before bf16)
    peft_unmerged_fp32 the PeftModel (LoRA on the fly): its greedy texts must equal merged_fp32's (checked)
    merged_bf16        finpipe's default on CPUs with AVX512-BF16/AMX (``runtime.inference_dtype``)
    merged_bf16_static the same with a static KV cache (``cache_implementation="static"``)
    merged_bf16_compile  the static cache and ``torch.compile`` of the forward (its compile time is reported apart)
    merged_bf16_int8_decode  the default precision with int8 decode steps (``finpipe.models.int8_decode``; CPU
                       only): what ``ask``, ``chat`` and ``serve`` use on a CPU (``--decode-weights auto``)
    nf4_adapter        a 4-bit NF4 base + the adapter, unmerged (as QLoRA trains)
    llama_cpp_q8_0     the exported q8_0 GGUF through llama-cpp-python, if it is installed

``--served`` also starts ``finpipe serve`` on a free loopback port (the lake's champion) and measures requests/s and
completion tokens/s with 1 client (one request at a time) and 4 concurrent clients, once with ``--decode-weights full``
and once with the default. ``--golden`` answers the lake's golden set at the default precision with and without int8
decode steps (batches of 4, the most that decode in int8) and reports both sets' strict metrics with intervals and
how many answers are identical: the price of int8 in correctness. Each row reports generated
tokens/s (sum of new tokens / generation seconds), load seconds, peak memory and how many answers equal the
baseline's. Model: the lake's SmolLM2 with its champion (or a random LoRA), else a tiny random Llama.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common
from finpipe import runtime
from finpipe.models.tiny import tiny_llama

NAME = "inference"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model, 2 prompts x 8 tokens (seconds)")
    p.add_argument("--json", help=f"results file (default benchmarks/results/{NAME}.json)")
    p.add_argument("--model", choices=("smollm2", "tiny"), default=None,
                   help="smollm2: the lake's SmolLM2 (+ champion) if present, else tiny (default smollm2; tiny "
                   "with --quick)")
    p.add_argument("--prompts", type=int, help="prompts per variant (default 6; quick 2)")
    p.add_argument("--max-new-tokens", type=int, help="default 48; quick 8")
    p.add_argument("--skip-nf4", action="store_true", help="leave out the 4-bit variant")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile variant (default with "
                   "--quick)")
    p.add_argument("--served", action="store_true", help="also measure `finpipe serve` at 1 and 4 clients (needs a "
                   "lake with a champion)")
    p.add_argument("--requests", type=int, default=8, help="requests per served measurement")
    p.add_argument("--golden", action="store_true", help="also score the golden set with full and int8 decode steps "
                   "(needs a lake with a golden set; a few minutes)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own; 1 with --quick)")
    args = p.parse_args(argv)
    args.model = args.model or ("tiny" if args.quick else "smollm2")
    args.prompts = args.prompts or (2 if args.quick else 6)
    args.max_new_tokens = args.max_new_tokens or (8 if args.quick else 48)
    args.threads = args.threads or (1 if args.quick else None)
    args.skip_compile = args.skip_compile or args.quick
    return args


def random_lora(base: Path, folder: Path, seed: int = 0) -> Path:
    """A LoRA with random A and B (r 16, alpha 32, all linear layers) on ``base``, saved with the base's tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                      task_type="CAUSAL_LM", init_lora_weights=False))
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(folder))
    del model
    return folder


def resolve_models(args, workdir: Path, train_texts) -> tuple[Path, Path, str]:
    base = _common.lake_base_model() if args.model == "smollm2" else None
    if base is not None:
        champion = _common.lake_champion_adapter()
        if champion is not None:
            return base, champion, f"lake base {base.name} + champion adapter {champion}"
        return base, random_lora(base, workdir / "random_lora"), (
            f"lake base {base.name}; no champion adapter in the lake: a random LoRA (r 16, all-linear, "
            "init_lora_weights=False)")
    note = ("no converted SmolLM2 in the lake: " if args.model == "smollm2" else "") + \
        "tiny random Llama (2 layers, hidden 64, BPE vocab 600) + random LoRA (r 16), built in-process"
    base = tiny_llama(workdir / "tiny_base", train_texts)
    return base, random_lora(base, workdir / "random_lora"), note


def prompts_for(args) -> tuple[list[list[dict]], list[str], str]:
    split = _common.lake_split()
    if split is not None:
        train, val = split
        note = "lake split files (val.jsonl)"
    else:
        train, val = _common.builtin_split(date_stride=9 if args.quick else 1)
        note = "grounded samples from the offline replay data, validation side"
    if len(val) < args.prompts:
        raise SystemExit(f"only {len(val)} validation samples for --prompts {args.prompts}")
    step = max(1, len(val) // args.prompts)  # spread over the split (families, dates)
    chosen = val[::step][: args.prompts]
    return [s.messages[:-1] for s in chosen], _common.sample_texts(train), note


def run_variant(name: str, dtype: str, load, chats, sampling, cuda: bool, compile_note: dict | None = None):
    from finpipe.evaluation.generation import Sampling, generate

    with _common.MemoryWindow(cuda) as mem:
        started = time.perf_counter()
        model, tokenizer = load()
        load_s = time.perf_counter() - started
        warm = time.perf_counter()
        generate(model, tokenizer, chats[0], Sampling(max_new_tokens=min(4, sampling.max_new_tokens)))  # warm-up
        warmup_s = time.perf_counter() - warm
        answers = [generate(model, tokenizer, chat, sampling) for chat in chats]
    tokens = sum(a.new_tokens for a in answers)
    seconds = sum(a.seconds for a in answers)
    row = {"variant": name, "dtype": dtype, "load_s": load_s, "warmup_s": warmup_s, "new_tokens": tokens,
           "gen_s": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0, "peak_mem_mb": mem.mb,
           "texts": [a.text for a in answers]}
    del model
    return row


def llama_cpp_row(base: Path, adapter: Path, chats, sampling, workdir: Path) -> dict[str, Any]:
    """The q8_0 GGUF export through llama-cpp-python (when installed), same prompts, greedy."""
    try:
        import llama_cpp
    except ImportError:
        return {"variant": "llama_cpp_q8_0", "skipped": "llama-cpp-python is not installed (it compiles llama.cpp "
                "from source: see docs/shipping.md)"}
    from finpipe.inference.export import export_gguf
    from finpipe.models.safe_loading import load_tokenizer
    from finpipe.runtime import claim_cpu_share

    export = export_gguf(base, adapter, workdir / "gguf", "bench", ("q8_0",), log=lambda *_: None)
    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(export.files[0].path), n_ctx=1024, n_threads=claim_cpu_share(),
                          verbose=False)
    load_s = time.perf_counter() - started
    tokenizer = load_tokenizer(adapter)
    texts, tokens, seconds = [], 0, 0.0
    for chat in chats:  # the prompt's token ids from finpipe's tokenizer: both engines read the very same prompt
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        started = time.perf_counter()
        out = llm.create_completion(list(prompt), max_tokens=sampling.max_new_tokens, temperature=0.0,
                                    stop=["<|im_end|>"])
        seconds += time.perf_counter() - started
        texts.append(out["choices"][0]["text"].strip())
        tokens += out["usage"]["completion_tokens"]
    return {"variant": "llama_cpp_q8_0", "dtype": "q8_0", "load_s": load_s, "new_tokens": tokens, "gen_s": seconds,
            "tokens_per_s": tokens / seconds if seconds else 0.0, "texts": texts}


def golden_parity(base: Path, adapter: Path, dtype, seed: int) -> dict[str, Any] | None:
    """The golden set answered at ``dtype`` with full and with int8 decode steps, in batches of 4: each side's strict
    metrics (bootstrap 95% intervals) and the identical answers."""
    from finpipe.evaluation.evaluate import HEADLINE_METRICS, score_answers, summarize
    from finpipe.evaluation.generation import DecodeSpec, Sampling, generate_batch, load_chat_model
    from finpipe.instructions.samples import read_jsonl
    from finpipe.models.int8_decode import DEFAULT_MAX_ROWS
    from finpipe.paths import DatasetFiles, lake_dir

    path = DatasetFiles.of(lake_dir()).golden
    if not path.exists():
        print(f"--golden: no golden set at {path} (`finpipe run` writes it); skipped", flush=True)
        return None
    golden = read_jsonl(path)
    sides: dict[str, Any] = {}
    for name, decode in (("full", None), ("int8_decode", DecodeSpec("int8"))):
        print(f"golden set ({len(golden)} answers), {name} ...", flush=True)
        model, tokenizer = load_chat_model(base, adapter, merge=True, dtype=dtype, decode=decode)
        started = time.perf_counter()
        answers = generate_batch(model, tokenizer, [s.messages[:-1] for s in golden], Sampling(), DEFAULT_MAX_ROWS)
        summary = summarize(score_answers(golden, [a.text for a in answers]), seed)
        sides[name] = {"seconds": round(time.perf_counter() - started, 1),
                       "metrics": {k: summary["overall"][k] for k in HEADLINE_METRICS},
                       "ci": summary["ci"], "texts": [a.text for a in answers]}
        del model
        runtime.release_memory()
    identical = sum(a == b for a, b in zip(sides["full"]["texts"], sides["int8_decode"]["texts"]))
    lines = [f"golden set, {len(golden)} answers in batches of {DEFAULT_MAX_ROWS}: {identical} identical with and "
             "without int8 decode steps"]
    for name, side in sides.items():
        lines.append(f"  {name:12s} " + ", ".join(f"{k} {v:.3f} [{side['ci'][k][0]:.2f}, {side['ci'][k][1]:.2f}]"
                                                  for k, v in side["metrics"].items() if v is not None and side["ci"].get(k))
                     + f" ({side['seconds']:.0f} s)")
    return {"samples": len(golden), "batch": DEFAULT_MAX_ROWS, "identical": identical,
            "sides": {k: {kk: vv for kk, vv in v.items() if kk != "texts"} for k, v in sides.items()},
            "summary": "\n".join(lines)}


def served_rows(requests: int, max_new_tokens: int, decode_weights: str = "auto") -> list[dict[str, Any]]:
    """requests/s and completion tokens/s of a real `finpipe serve` with 1 and 4 concurrent clients."""
    import os
    import socket
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from finpipe.runtime import release_cpu_share

    release_cpu_share()  # this process only waits on the server: its claim would halve the server's threads
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "finpipe.cli", "serve", "--port", str(port),
                             "--decode-weights", decode_weights],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    questions = ["What is AAPL's trend?", "How volatile is MSFT right now?", "Is IBM overbought or oversold?",
                 "How far is GOOG from its 52-week high?"]
    rows = []
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("finpipe serve did not start")
            time.sleep(0.5)

        def ask(i: int) -> int:
            body = {"model": "champion", "max_tokens": max_new_tokens,
                    "messages": [{"role": "user", "content": questions[i % len(questions)]}]}
            reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()
            return reply["usage"]["completion_tokens"]

        ask(0)  # loads the champion, warms up
        for clients in (1, 4):
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                tokens = sum(pool.map(ask, range(requests)))
            seconds = time.perf_counter() - started
            rows.append({"variant": f"served_{decode_weights}_{clients}_client{'s' if clients > 1 else ''}",
                         "requests": requests,
                         "seconds": seconds, "requests_per_s": requests / seconds, "new_tokens": tokens,
                         "tokens_per_s": tokens / seconds})
        rows[-1]["batches"] = httpx.get(f"{url}/health").json()["batches"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with _common.quiet_session(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from finpipe.evaluation.generation import DecodeSpec, Sampling, load_chat_model
    from finpipe.runtime import inference_dtype
    from finpipe.training.sft import load_adapter

    machine = _common.machine()
    cuda = runtime.accelerator() == "cuda"
    device = "cuda" if cuda else "cpu"
    fast = inference_dtype(device)
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    sampling = Sampling(max_new_tokens=args.max_new_tokens)
    chats, train_texts, data_note = prompts_for(args)

    with tempfile.TemporaryDirectory(prefix="finpipe-bench-inference-") as tmp:
        base, adapter, model_note = resolve_models(args, Path(tmp), train_texts)
        print(f"model: {model_note}\nprompts: {len(chats)} from {data_note}; greedy, max_new_tokens "
              f"{args.max_new_tokens}, one at a time with the KV cache on {device}", flush=True)

        def merged(dtype, static: bool = False, compiled: bool = False, int8: bool = False):
            def load():
                model, tokenizer = load_chat_model(base, adapter, device=device, merge=True, dtype=dtype,
                                                   decode=DecodeSpec("int8") if int8 else None)
                if static:
                    model.generation_config.cache_implementation = "static"
                if compiled:
                    model.forward = torch.compile(model.forward, dynamic=False)
                return model.eval(), tokenizer
            return load

        def nf4():
            from transformers import AutoTokenizer

            model = load_adapter(base, adapter, quantization="nf4")
            return model.eval(), AutoTokenizer.from_pretrained(str(adapter))

        f = short[fast]
        variants = [("merged_fp32", "fp32", merged(torch.float32)),
                    ("peft_unmerged_fp32", "fp32", lambda: load_chat_model(base, adapter, device=device,
                                                                           dtype=torch.float32))]
        if fast != torch.float32:
            variants.append((f"merged_{f}", f, merged(fast)))
        variants.append((f"merged_{f}_static", f, merged(fast, static=True)))
        if not args.skip_compile:
            variants.append((f"merged_{f}_compile", f, merged(fast, static=True, compiled=True)))
        if not cuda:
            variants.append((f"merged_{f}_int8_decode", f"{f}+int8", merged(fast, int8=True)))
        if not args.skip_nf4:
            variants.append(("nf4_adapter", "nf4", nf4))
        print("warm-up (not reported) ...", flush=True)
        run_variant("warmup", "fp32", variants[0][2], chats[:1], Sampling(max_new_tokens=4), cuda)
        runtime.release_memory()
        rows = []
        for name, dtype, load in variants:
            print(f"running {name} ...", flush=True)
            rows.append(run_variant(name, dtype, load, chats, sampling, cuda))
            runtime.release_memory()
        if not args.quick:
            print("running llama_cpp_q8_0 ...", flush=True)
            rows.append(llama_cpp_row(base, adapter, chats, sampling, Path(tmp)))
        golden = golden_parity(base, adapter, fast, seed=0) if args.golden and not cuda else None
    if args.served:
        for weights in ("full", "auto"):
            print(f"running finpipe serve --decode-weights {weights} at 1 and 4 clients ...", flush=True)
            rows += served_rows(args.requests, args.max_new_tokens, weights)

    baseline = rows[0]
    for r in rows:
        if "texts" in r:
            r["same_text_as_baseline"] = sum(a == b for a, b in zip(r["texts"], baseline["texts"]))
        r["speedup"] = (r["tokens_per_s"] / baseline["tokens_per_s"]
                        if r.get("tokens_per_s") and baseline["tokens_per_s"] else None)
    unmerged = next(r for r in rows if r["variant"] == "peft_unmerged_fp32")
    merged_equal = unmerged["texts"] == baseline["texts"]
    result = {
        "benchmark": NAME,
        "machine": machine,
        "config": {"quick": args.quick, "model": model_note, "prompts": len(chats), "data": data_note,
                   "max_new_tokens": args.max_new_tokens, "decoding": "greedy, KV cache, batch 1", "device": device,
                   "baseline": baseline["variant"], "default_precision": f,
                   "memory": "CUDA max_memory_allocated" if cuda else
                             "peak VmRSS above the VmRSS before loading (RssPeak), load + generation"},
        "rows": rows,
        "ratios": {f"{r['variant']}_vs_{baseline['variant']}_tokens_per_s": round(r["speedup"], 3)
                   for r in rows[1:] if r.get("speedup")},
        "checks": {"merged_greedy_texts_identical_to_unmerged_at_the_same_precision": merged_equal},
        "golden_int8_parity": golden,
    }
    columns = ["variant", "dtype", "load_s", "warmup_s", "new_tokens", "gen_s", "tokens_per_s", "speedup",
               "requests_per_s", "peak_mem_mb", "same_text_as_baseline", "skipped"]
    table = _common.format_table(rows, columns)
    table += (f"\nspeedup and same_text_as_baseline are relative to {baseline['variant']} (out of {len(chats)} "
              f"answers)\nmerged greedy texts identical to unmerged (fp32): {merged_equal}")
    if golden:
        table += "\n" + golden["summary"]
    out = _common.finish(NAME, result, args.json, table)
    if not merged_equal:
        raise SystemExit("merged and unmerged greedy texts differ at the same precision")
    return out


if __name__ == "__main__":
    main()
