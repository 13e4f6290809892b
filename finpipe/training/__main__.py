"""Train an adapter outside Dagster with the same code path, e.g. on several GPUs:

    accelerate launch --num_processes 4 -m finpipe.training \\
        --base data_lake/models/base/SmolLM2-135M-Instruct \\
        --train data_lake/datasets/split/train.jsonl --val data_lake/datasets/split/val.jsonl \\
        --out data_lake/models/adapters/multi-gpu-run --max-steps 500 --batch-size 8

Every AdapterSpec field is an option (--lora-r, --learning-rate, --quantization, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from finpipe.instructions.samples import read_jsonl
from finpipe.settings import add_options, chosen
from finpipe.training.sft import train_adapter
from finpipe.training.spec import AdapterSpec


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finpipe.training", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--val", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--job-dir", type=Path, help="checkpoints (default: <out>.job); rerun to resume")
    add_options(parser, AdapterSpec)  # every AdapterSpec field, with its help and default
    args = parser.parse_args(argv)
    spec = AdapterSpec(**chosen(args, AdapterSpec))
    report = train_adapter(args.base, read_jsonl(args.train), read_jsonl(args.val),
                           args.job_dir or args.out.with_suffix(".job"), args.out, spec)
    if int(os.environ.get("RANK", "0")) == 0:  # one report, not one per process of a multi-GPU launch
        print(json.dumps({k: v for k, v in dataclasses.asdict(report).items() if k not in ("train_losses", "spec")},
                         indent=2))


if __name__ == "__main__":
    main()
