"""One training across several processes: the same ``train_adapter`` run by ``torch.distributed.run`` (torchrun), one
rank per process, DistributedDataParallel over gloo on a CPU or NCCL on GPUs (one process per GPU).

``AdapterSpec.processes`` says how many; the ``qlora_adapter`` asset, ``python -m finpipe.training`` and
``deploy/accelerate_multi_gpu.sh`` all come here when it is above 1. Each rank trains on its own share of every
global batch (``batch_size`` samples per process and step), gradients are averaged across ranks, and only rank 0
writes checkpoints, TensorBoard logs and the adapter (``finpipe.training.sft``). Rerunning the same job resumes its
newest complete checkpoint, whichever rank died.

torchrun rather than ``accelerate launch``: ``accelerate launch --cpu --num_processes 2`` silently runs one process,
and accelerate's own multi-GPU launcher is torchrun underneath; the Trainer's accelerator picks the backend (gloo or
NCCL) from the environment torchrun sets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from finpipe.training.spec import AdapterSpec

#: the variables torchrun sets for its ranks: a launch from inside a rank (a test's, a nested run) must not inherit them
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                  "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")
SPEC_FILE = "launch_spec.json"


class LaunchError(RuntimeError):
    """The distributed training failed; the message holds the end of its output."""


def world_size() -> int:
    """Processes of the training this process belongs to (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def distributed() -> bool:
    """Whether this process is one rank of several (torch.distributed initialised by the Trainer's accelerator)."""
    import sys

    dist = getattr(sys.modules.get("torch"), "distributed", None)
    return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def gpus_outnumbered() -> bool:
    """More ranks on this node than GPUs: two ranks on a one-GPU workstation, the multi-GPU path tried small."""
    import torch

    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or world_size()
    return world_size() > 1 and torch.cuda.is_available() and ranks_here > torch.cuda.device_count()


def share_gpus_if_outnumbered(log: Callable[[str], None] = print) -> str | None:
    """Where ranks outnumber GPUs, they share them round-robin and talk over gloo (NCCL refuses two ranks on one
    GPU: "Duplicate GPU detected"). Returns the DDP backend the Trainer must then use, None where each rank has a GPU
    of its own (NCCL) or there is none. Runs before anything creates accelerate's state, which puts a rank on
    ``cuda:LOCAL_RANK`` and picks NCCL for any CUDA rank."""
    if not gpus_outnumbered():
        return None
    import torch
    from accelerate import PartialState

    gpus = torch.cuda.device_count()
    os.environ["LOCAL_RANK"] = str(int(os.environ.get("LOCAL_RANK", "0") or 0) % gpus)
    PartialState(backend="gloo")
    log(f"{world_size()} ranks share {gpus} GPU(s), over gloo: NCCL needs one GPU per rank")
    return "gloo"


def max_across_ranks(value: float) -> float:
    """The largest ``value`` of all ranks. Under DDP each rank must take the same decisions (learning rate, evaluation,
    stop) at the same step: a rank stopping alone would leave the others waiting in their next all-reduce forever,
    and ranks on different learning rates would drift apart."""
    import torch
    import torch.distributed as dist

    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def launch_command(base_dir: str | Path, train_path: Path, val_path: Path, job_dir: Path, adapter_dir: Path,
                   spec: AdapterSpec, init_adapter: str | Path | None = None, init_tokens: int = 0,
                   replay_cache: Path | None = None) -> list[str]:
    """The torchrun command line; writes the spec beside the job's checkpoints (``SPEC_FILE``)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    spec_file = job_dir / SPEC_FILE
    spec_file.write_text(json.dumps(asdict(spec), indent=2))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(spec.processes),
               "-m", "finpipe.training", "--base", str(base_dir), "--train", str(train_path), "--val", str(val_path),
               "--out", str(adapter_dir), "--job-dir", str(job_dir), "--spec-json", str(spec_file), "--no-report"]
    if init_adapter is not None:
        command += ["--init-adapter", str(init_adapter), "--init-tokens", str(init_tokens)]
    if replay_cache is not None:
        command += ["--replay-cache", str(replay_cache)]
    return command


def train_in_processes(base_dir: str | Path, train_path: Path, val_path: Path, job_dir: Path, adapter_dir: Path,
                       spec: AdapterSpec, log: Callable[[str], None] = print, init_adapter: str | Path | None = None,
                       init_tokens: int = 0, replay_cache: Path | None = None, tail_lines: int = 40):
    """Train with ``spec.processes`` ranks and return rank 0's ``TrainReport``. Rank 0's progress lines reach ``log``
    as they come; a failed launch raises ``LaunchError`` with the end of the output. An interrupted caller (Ctrl-C, a
    terminated Dagster step) takes every rank down with it: they run in their own process group."""
    from finpipe.training.sft import TrainReport

    command = launch_command(base_dir, train_path, val_path, job_dir, adapter_dir, spec, init_adapter, init_tokens,
                             replay_cache)
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for several ranks, without its warning
    log(f"training on {spec.processes} processes (torch.distributed.run; rank 0 writes): {' '.join(command[3:8])}")
    tail: deque[str] = deque(maxlen=tail_lines)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               bufsize=1, start_new_session=True)
    try:
        for line in process.stdout:  # type: ignore[union-attr]
            line = line.rstrip("\n")
            tail.append(line)
            if line.startswith(PROGRESS_PREFIX):
                log(line.removeprefix(PROGRESS_PREFIX))
        code = process.wait()
    except BaseException:
        _stop_group(process)
        raise
    if code != 0:
        raise LaunchError(f"training on {spec.processes} processes failed (exit {code}); rerun to resume from its "
                          f"newest checkpoint in {job_dir}. Its last output:\n" + "\n".join(tail))
    report = json.loads((adapter_dir / "training_report.json").read_text())
    report["train_losses"] = [tuple(x) for x in report["train_losses"]]
    report["eval_losses"] = [tuple(x) for x in report["eval_losses"]]
    return TrainReport(**report)


#: rank 0's log lines, told apart from library output on the same stream (``python -m finpipe.training`` under a launch)
PROGRESS_PREFIX = "finpipe-train: "


def _stop_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
