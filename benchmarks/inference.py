"""Generation throughput with the KV cache: base + adapter unmerged vs merged, bf16 vs fp32, and a 4-bit NF4 base.

    python -m benchmarks.inference [--quick] [--json PATH] [--model smollm2|tiny] [--prompts 6] [--max-new-tokens 48]

Every variant answers the same chat prompts (system + user turns of the dataset's samples) one at a time through
``finpipe.evaluation.generation.generate`` (chat template, greedy, KV cache, stop at end of turn), same
``Sampling(max_new_tokens=...)``; one untimed warm-up generation per variant. Variants, in finpipe's inference
precision D (fp32 on CPU, bf16/fp16 on CUDA: ``generation.inference_dtype``) and the other one O:

    peft_unmerged_D   ``load_chat_model(base, adapter)``: the PeftModel, LoRA applied on the fly (finpipe's default)
    merged_D          the same, ``merge_and_unload()``-ed: the greedy texts must be identical to unmerged_D (checked)
    merged_O          the merged model cast to the other precision (bf16 vs fp32)
    nf4_adapter       ``finpipe.training.sft.load_adapter(base, adapter, "nf4")``: ``load_base(base, "nf4", plan)``
                      (4-bit NF4 base, compute dtype of the training plan) + the adapter, unmerged (as QLoRA trains)

Reported per variant: generated tokens per second (sum of new tokens / sum of generate() seconds), load seconds,
peak memory (CPU: peak VmRSS from before loading to the end, above the VmRSS before loading; CUDA:
max_memory_allocated), and how many answers are identical to peft_unmerged_D's.

Model: the lake's converted SmolLM2 (``models/base/current.json``) with the champion adapter
(``models/adapters/champion.json``) when present; without a champion a random LoRA (r 16, all linear layers,
``init_lora_weights=False``) on that base; without the base a tiny random Llama + random LoRA built in-process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common

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
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own; 1 with --quick)")
    args = p.parse_args(argv)
    args.model = args.model or ("tiny" if args.quick else "smollm2")
    args.prompts = args.prompts or (2 if args.quick else 6)
    args.max_new_tokens = args.max_new_tokens or (8 if args.quick else 48)
    args.threads = args.threads or (1 if args.quick else None)
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
    base = _common.tiny_llama(workdir / "tiny_base", train_texts)
    return base, random_lora(base, workdir / "random_lora"), note


def prompts_for(args) -> tuple[list[list[dict]], list[str], str]:
    split = _common.lake_split()
    if split is not None:
        train, val = split
        note = "lake split files (val.jsonl)"
    else:
        train, val = _common.builtin_split(date_stride=9 if args.quick else 1)
        note = "grounded samples from the offline replay data (finpipe_tests default_samples), validation side"
    if len(val) < args.prompts:
        raise SystemExit(f"only {len(val)} validation samples for --prompts {args.prompts}")
    step = max(1, len(val) // args.prompts)  # spread over the split (families, dates)
    chosen = val[::step][: args.prompts]
    return [s.messages[:-1] for s in chosen], _common.sample_texts(train), note


def run_variant(name: str, dtype: str, load, chats, sampling, cuda: bool) -> dict[str, Any]:
    from finpipe.evaluation.generation import Sampling, generate

    with _common.MemoryWindow(cuda) as mem:
        started = time.perf_counter()
        model, tokenizer = load()
        load_s = time.perf_counter() - started
        generate(model, tokenizer, chats[0], Sampling(max_new_tokens=min(4, sampling.max_new_tokens)))  # warm-up
        answers = [generate(model, tokenizer, chat, sampling) for chat in chats]
    tokens = sum(a.new_tokens for a in answers)
    seconds = sum(a.seconds for a in answers)
    row = {"variant": name, "dtype": dtype,
           "model_class": type(model).__name__, "load_s": load_s, "new_tokens": tokens, "gen_s": seconds,
           "tokens_per_s": tokens / seconds if seconds else 0.0, "peak_mem_mb": mem.mb,
           "texts": [a.text for a in answers]}
    del model
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with _common.quiet_session(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from finpipe.evaluation.generation import Sampling, inference_dtype, load_chat_model
    from finpipe.training.device import plan_device
    from finpipe.training.sft import load_adapter

    machine = _common.machine()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    default = inference_dtype(device)
    other = torch.float32 if default != torch.float32 else torch.bfloat16
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    sampling = Sampling(max_new_tokens=args.max_new_tokens)
    chats, train_texts, data_note = prompts_for(args)

    with tempfile.TemporaryDirectory(prefix="finpipe-bench-inference-") as tmp:
        base, adapter, model_note = resolve_models(args, Path(tmp), train_texts)
        print(f"model: {model_note}\nprompts: {len(chats)} from {data_note}; greedy, max_new_tokens "
              f"{args.max_new_tokens}, one at a time with the KV cache on {device}", flush=True)

        def merged(dtype=None):
            model, tokenizer = load_chat_model(base, adapter, device=device)
            model = model.merge_and_unload()
            if dtype is not None:
                model = model.to(dtype)
            return model.eval(), tokenizer

        def nf4():
            from transformers import AutoTokenizer

            model = load_adapter(base, adapter, quantization="nf4")  # sft.load_base(..., "nf4", plan) + PeftModel
            return model.eval(), AutoTokenizer.from_pretrained(str(adapter))

        d, o = short[default], short[other]
        variants = [(f"peft_unmerged_{d}", d, lambda: load_chat_model(base, adapter, device=device)),
                    (f"merged_{d}", d, merged),
                    (f"merged_{o}", o, lambda: merged(other))]
        if not args.skip_nf4:
            variants.append(("nf4_adapter", f"nf4 + {short[getattr(torch, plan_device().compute_dtype)]} compute",
                             nf4))
        # untimed: one load + generation of the reference first, so that one-time costs (lazy imports, kernel and
        # allocator warm-up) do not land in the first variant's time and memory
        print("warm-up (not reported) ...", flush=True)
        run_variant("warmup", d, variants[0][2], chats[:1], Sampling(max_new_tokens=4), cuda)
        _common.release_memory()
        rows = []
        for name, dtype, load in variants:
            print(f"running {name} ...", flush=True)
            rows.append(run_variant(name, dtype, load, chats, sampling, cuda))
            _common.release_memory()

    reference = rows[0]
    for r in rows:
        r["same_text_as_reference"] = sum(a == b for a, b in zip(r["texts"], reference["texts"]))
        r["speedup"] = r["tokens_per_s"] / reference["tokens_per_s"] if reference["tokens_per_s"] else None
    merged_equal = rows[1]["texts"] == reference["texts"]
    mismatches = [{"prompt": i, "unmerged": a, "merged": b}
                  for i, (a, b) in enumerate(zip(reference["texts"], rows[1]["texts"])) if a != b]
    result = {
        "benchmark": NAME,
        "machine": machine,
        "config": {"quick": args.quick, "model": model_note, "prompts": len(chats), "data": data_note,
                   "max_new_tokens": args.max_new_tokens, "decoding": "greedy, KV cache, batch 1", "device": device,
                   "reference": reference["variant"],
                   "nf4_compute_dtype": plan_device().compute_dtype,
                   "memory": "CUDA max_memory_allocated" if cuda else
                             "peak VmRSS above the VmRSS before loading (RssPeak), load + generation"},
        "rows": rows,
        "ratios": {f"{r['variant']}_vs_{reference['variant']}_tokens_per_s": round(r["speedup"], 3)
                   for r in rows[1:] if r["speedup"]},
        "checks": {"merged_greedy_texts_identical_to_unmerged": merged_equal, "mismatches": mismatches},
    }
    columns = ["variant", "dtype", "load_s", "new_tokens", "gen_s", "tokens_per_s", "speedup", "peak_mem_mb",
               "same_text_as_reference"]
    table = _common.format_table(rows, columns)
    table += (f"\nspeedup and same_text_as_reference are relative to {reference['variant']} "
              f"(out of {len(chats)} answers)\nmerged greedy texts identical to unmerged: {merged_equal}")
    out = _common.finish(NAME, result, args.json, table)
    if not merged_equal:
        raise SystemExit(f"merged and unmerged greedy texts differ: {mismatches}")
    return out


if __name__ == "__main__":
    main()
