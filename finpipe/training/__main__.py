"""Train an adapter outside Dagster with the same code path, e.g. on several GPUs or CPU processes:

    python -m finpipe.training --processes 4 \\
        --base data_lake/models/base/SmolLM2-135M-Instruct \\
        --train data_lake/datasets/split/train.jsonl --val data_lake/datasets/split/val.jsonl \\
        --out data_lake/models/adapters/multi-gpu-run --max-steps 500 --batch-size 8

Every AdapterSpec field is an option (--lora-r, --learning-rate, --quantization, --processes, ...). With
``--processes N`` above 1 it relaunches itself under ``torch.distributed.run`` (``finpipe.training.launch``); run
under torchrun or ``accelerate launch`` directly, each rank trains its share.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from finpipe.instructions.samples import read_jsonl
from finpipe.settings import add_options, chosen
from finpipe.training import launch
from finpipe.training.spec import AdapterSpec


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finpipe.training", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--val", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--job-dir", type=Path, help="checkpoints (default: <out>.job); rerun to resume")
    parser.add_argument("--spec-json", type=Path, help="an AdapterSpec as JSON (what a launch writes); options given "
                                                       "on the command line win over it")
    parser.add_argument("--init-adapter", help="continue from this adapter's weights (warm start)")
    parser.add_argument("--init-tokens", type=int, default=0, help="tokens the --init-adapter was trained on")
    parser.add_argument("--replay-cache", type=Path, help="the general replay's cache folder")
    parser.add_argument("--no-report", action="store_true", help="print no JSON report (a launch reads the file)")
    add_options(parser, AdapterSpec)  # every AdapterSpec field, with its help and default
    args = parser.parse_args(argv)
    given = json.loads(args.spec_json.read_text()) if args.spec_json else {}
    spec = AdapterSpec(**(given | chosen(args, AdapterSpec)))
    job_dir = args.job_dir or args.out.with_suffix(".job")
    if spec.processes > 1 and launch.world_size() == 1:  # not launched yet: launch the ranks
        report = launch.train_in_processes(args.base, args.train, args.val, job_dir, args.out, spec,
                                           init_adapter=args.init_adapter, init_tokens=args.init_tokens,
                                           replay_cache=args.replay_cache)
    else:
        from finpipe.training.sft import train_adapter

        main_rank = launch.rank() == 0
        prefix = launch.PROGRESS_PREFIX if launch.world_size() > 1 else ""
        report = train_adapter(args.base, read_jsonl(args.train), read_jsonl(args.val), job_dir, args.out, spec,
                               log=(lambda line: print(prefix + line, flush=True)) if main_rank else _silent,
                               init_adapter=args.init_adapter, init_tokens=args.init_tokens,
                               replay_cache=args.replay_cache)
        if not main_rank:
            return
    if not args.no_report:  # one report, not one per process of a multi-GPU launch
        print(json.dumps({k: v for k, v in dataclasses.asdict(report).items() if k not in ("train_losses", "spec")},
                         indent=2))


def _silent(_line: str) -> None:
    pass


if __name__ == "__main__":
    main()
