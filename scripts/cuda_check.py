"""CUDA check of finpipe's training and generation paths on a random-initialised model of the base's shape (no hub,
no weights needed): QLoRA (the CUDA default) and LoRA bf16 for one minute each, then generation, single and batched.

    python scripts/cuda_check.py BASE_DIR TRAIN_JSONL VAL_JSONL [OUT_DIR]

BASE_DIR needs only config.json, the tokenizer files and chat_template.jinja (e.g. a copy of
data_lake/models/base/SmolLM2-135M-Instruct without its weights). Results: OUT_DIR/gpu_check.json.
"""
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

source, train_path, val_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
out = Path(sys.argv[4]) if len(sys.argv) > 4 else Path(".")
base = Path("/tmp/finpipe_cuda_check_base")
cfg = AutoConfig.from_pretrained(source)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(base)
AutoTokenizer.from_pretrained(source).save_pretrained(base)
for f in ("chat_template.jinja",):
    (base / f).write_bytes((source / f).read_bytes())
del model
print("gpu:", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)

from finpipe.evaluation.generation import Sampling, generate, generate_batch, load_chat_model  # noqa: E402
from finpipe.instructions.samples import read_jsonl  # noqa: E402
from finpipe.training.sft import train_adapter  # noqa: E402
from finpipe.training.spec import AdapterSpec  # noqa: E402

train, val = read_jsonl(train_path), read_jsonl(val_path)
results = {}
for name, over in (("qlora_auto", {}), ("lora_bf16", {"quantization": "none"})):
    spec = AdapterSpec(max_minutes=1.0, batch_size=16, eval_points=2, general_replay_share=0.0,
                       curve_answers_per_family=1, max_val_samples=16, **over)
    started = time.perf_counter()
    try:
        r = train_adapter(str(base), train, val, Path(f"/tmp/job_{name}"), Path(f"/tmp/adapter_{name}"), spec,
                          log=lambda line, name=name: print(f"[{name}] {line}", flush=True))
        results[name] = {"steps": r.steps, "train_tokens": r.train_tokens, "tokens_per_s": r.tokens_per_s,
                         "stopped_by": r.stopped_by, "device_note": r.device_note,
                         "wall_s": round(time.perf_counter() - started, 1), "best_val_loss": r.best_eval_loss}
    except Exception as exc:  # noqa: BLE001 - record and go on to the next check
        import traceback

        traceback.print_exc()
        results[name] = {"error": repr(exc)[:500]}
    print(name, results[name], flush=True)

adapter = "/tmp/adapter_lora_bf16" if Path("/tmp/adapter_lora_bf16").exists() else None
model, tokenizer = load_chat_model(str(base), adapter, merge=True)
print("generation model:", next(model.parameters()).device, next(model.parameters()).dtype, flush=True)
chats = [[{"role": "system", "content": s.messages[0]["content"]}, {"role": "user", "content": s.text_of("user")}]
         for s in val[:32]]
sampling = Sampling(max_new_tokens=64)
generate(model, tokenizer, chats[0], sampling)  # warm-up


def timed(name: str, answers) -> None:
    started = time.perf_counter()
    done = answers()
    tokens = sum(g.new_tokens for g in done)
    results[name] = {"answers": len(done), "new_tokens": tokens,
                     "tokens_per_s": round(tokens / (time.perf_counter() - started), 1)}


timed("generate_single", lambda: [generate(model, tokenizer, c, sampling) for c in chats[:8]])
timed("generate_batch32", lambda: generate_batch(model, tokenizer, chats, sampling, batch_size=32))
print(json.dumps(results, indent=1), flush=True)
(out / "gpu_check.json").write_text(json.dumps(results, indent=1))
