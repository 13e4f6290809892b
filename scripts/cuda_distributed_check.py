"""The multi-process training path on a GPU (issue 29): `python -m finpipe.training --processes N`, the command
`deploy/accelerate_multi_gpu.sh` and the `processes` setting of `qlora_adapter` run, on a random-initialised model of
a real shape (no weights travel to a lent GPU machine: the numbers measure speed and that the path runs, not quality).

    python scripts/cuda_distributed_check.py BASE_DIR TRAIN_JSONL VAL_JSONL OUT_DIR [--shape 1.7B] [--steps 40]

BASE_DIR needs only config.json, the tokenizer files and chat_template.jinja (SmolLM2-135M-Instruct's: the 1.7B model
shares its tokenizer). It records, in OUT_DIR/cuda_distributed_check.json:
- whether NCCL admits two ranks on one GPU (a two-rank all-reduce, both on cuda:0);
- one process against two ranks on the same global batch, and two ranks at one process's batch each: real tokens/s
  in all and per process, steps, wall time, peak GPU memory, and the first losses of each run.
With fewer GPUs than ranks the ranks share them over gloo (`launch.share_gpus_if_outnumbered`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

#: SmolLM2-1.7B-Instruct's shape (its config.json on the hub); the 135M's tokenizer and vocabulary are the same
SHAPES = {
    "1.7B": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32, "head_dim": 64, "rope_parameters": {"rope_theta": 130000.0,
                                                                           "rope_type": "default"}},
    "135M": {},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16},
}

NCCL_PROBE = """
import os, torch, torch.distributed as dist
dist.init_process_group("nccl")
torch.cuda.set_device(0)
x = torch.ones(4, device="cuda:0") * (dist.get_rank() + 1)
dist.all_reduce(x)
torch.cuda.synchronize()
print("rank", dist.get_rank(), "all_reduce ->", x.tolist(), "nccl", torch.cuda.nccl.version(), flush=True)
dist.destroy_process_group()
"""


def random_base(source: Path, shape: str, target: Path) -> dict:
    """A random-initialised Llama of ``shape`` beside ``source``'s tokenizer files, saved as safetensors in bf16."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(source)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    (target / "chat_template.jinja").write_bytes((source / "chat_template.jinja").read_bytes())
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"shape": shape, "parameters": params}


def nccl_two_ranks_one_gpu(out: Path) -> dict:
    probe = out / "nccl_probe.py"
    probe.write_text(NCCL_PROBE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(probe)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        return {"admitted": False, "outcome": "hung for 120 s", "tail": str(exc.stdout)[-1500:]}
    text = done.stdout + done.stderr
    lines = [line for line in text.splitlines() if "rank" in line or "NCCL" in line or "Error" in line]
    return {"admitted": done.returncode == 0, "exit": done.returncode, "evidence": lines[-12:]}


def train(base: Path, train_path: Path, val_path: Path, out: Path, name: str, processes: int, batch: int,
          steps: int, quantization: str, timeout_s: int = 200) -> dict:
    adapter = out / f"adapter_{name}"
    command = [sys.executable, "-m", "finpipe.training", "--base", str(base), "--train", str(train_path),
               "--val", str(val_path), "--out", str(adapter), "--processes", str(processes),
               "--batch-size", str(batch), "--max-steps", str(steps), "--max-minutes", "4",
               "--quantization", quantization, "--eval-points", "1", "--max-val-samples", "16",
               "--curve-answers-per-family", "0", "--general-replay-share", "0", "--balance-labels", "false",
               "--logging-steps", "5"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # a hung rank is stopped with its launcher
    try:
        text, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        text, _ = process.communicate()
        text += f"\n(stopped after {timeout_s} s)"
    wall = round(time.perf_counter() - started, 1)
    (out / f"train_{name}.log").write_text(text)
    if process.returncode != 0:
        return {"error": f"exit {process.returncode}", "tail": text[-3000:], "wall_s": wall}
    report = json.loads((adapter / "training_report.json").read_text())
    return {"processes": processes, "batch_per_process": batch, "global_batch": processes * batch,
            "steps": report["steps"], "train_tokens": report["train_tokens"],
            "tokens_per_s": report["tokens_per_s"], "tokens_per_s_per_process": round(report["tokens_per_s"] /
                                                                                      processes, 1),
            "train_seconds": report["seconds"], "wall_s": wall, "peak_memory_mb_rank0": report["peak_memory_mb"],
            "device_note": report["device_note"], "first_losses": report["train_losses"][:4]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("train", type=Path)
    parser.add_argument("val", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", default="1.7B", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quantization", default="auto")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    results: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        results |= {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                    "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
        results["nccl_two_ranks_on_one_gpu"] = nccl_two_ranks_one_gpu(args.out)
        print(json.dumps(results, indent=1), flush=True)

    def save() -> None:
        (args.out / "cuda_distributed_check.json").write_text(json.dumps(results, indent=1))

    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"finpipe_random_{args.shape}"
    started = time.perf_counter()
    results["model"] = random_base(args.base, args.shape, base) | {"build_s": round(time.perf_counter() - started, 1)}
    print(results["model"], flush=True)
    runs = {"one_process": (1, args.batch), "two_ranks_same_global_batch": (2, args.batch // 2),
            "two_ranks_same_batch_each": (2, args.batch)}
    for name, (processes, batch) in runs.items():
        results[name] = train(base, args.train, args.val, args.out, name, processes, batch, args.steps,
                              args.quantization)
        print(name, json.dumps(results[name]), flush=True)
        save()
    save()


if __name__ == "__main__":
    main()
