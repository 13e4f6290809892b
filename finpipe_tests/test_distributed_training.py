"""Training across processes for real: torch.distributed (gloo) ranks on this CPU, launched by finpipe's own launcher
(``finpipe.training.launch``), against a single process on the same global batch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finpipe.instructions.samples import Sample, write_jsonl
from finpipe.paths import REPO_ROOT
from finpipe.training.launch import RANK_VARIABLES

pytestmark = pytest.mark.slow  # starts torch.distributed worker processes


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from finpipe_tests.test_scale_out_and_security import _tiny_model_folder

    return _tiny_model_folder(tmp_path_factory.mktemp("tiny_model"), num_layers=2)


def _sample(i: int) -> Sample:
    day = f"2013-01-{i % 28 + 1:02d}"
    return Sample(id=f"s{i}", family="close", tickers=["AAPL"], as_of=day, messages=[
        {"role": "system", "content": "You are finpipe."},
        {"role": "user", "content": f"Where did AAPL close on {day}?"},
        {"role": "assistant", "content": f"AAPL closed at {400 + i}.25 on {day}."}])


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("split")
    write_jsonl([_sample(i) for i in range(64)], folder / "train.jsonl")
    write_jsonl([_sample(i) for i in range(64, 72)], folder / "val.jsonl")
    return folder / "train.jsonl", folder / "val.jsonl"


#: what makes one process and two see the same global batches in the same order: a plain random sampler (length
#: grouping pools batches per process), no label balancing or general replay, fp32, a loss logged every step
SAME_BATCHES = ["--quantization", "none", "--group-by-length", "false", "--balance-labels", "false",
                "--general-replay-share", "0", "--logging-steps", "1", "--max-val-samples", "4",
                "--curve-answers-per-family", "0", "--max-minutes", "0", "--max-epochs", "0", "--learning-rate", "5e-3"]


def _train(base: Path, split: tuple[Path, Path], out: Path, *options: str, timeout: float = 600):
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES} | {"FINPIPE_CPU_BF16": "0"}
    command = [sys.executable, "-m", "finpipe.training", "--base", str(base), "--train", str(split[0]),
               "--val", str(split[1]), "--out", str(out), *SAME_BATCHES, *options]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_processes_learn_what_one_process_learns_on_the_same_global_batch(tmp_path, tiny_model, split):
    one = _train(tiny_model, split, tmp_path / "one", "--batch-size", "4", "--max-steps", "6", "--eval-points", "1")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train(tiny_model, split, tmp_path / "two", "--batch-size", "2", "--processes", "2", "--max-steps", "6",
                 "--eval-points", "1")
    assert two.returncode == 0, two.stderr[-3000:] + two.stdout[-3000:]
    single = json.loads((tmp_path / "one" / "training_report.json").read_text())
    double = json.loads((tmp_path / "two" / "training_report.json").read_text())
    assert (single["processes"], double["processes"]) == (1, 2)
    assert double["spec"]["processes"] == 2 and double["steps"] == single["steps"] == 6
    assert double["train_tokens"] == single["train_tokens"]  # every rank's tokens counted once
    losses = [(dict(single["train_losses"])[s], loss) for s, loss in double["train_losses"]]
    assert len(losses) == 6
    # the same samples in the same global batches: the gradients differ only in the order of their reduction (equal
    # to 4 decimals here); ranks that trained apart on their halves of each batch were 1e-3 to 1e-2 off by step 6
    assert max(abs(a - b) for a, b in losses) < 5e-4, losses
    assert losses[-1][1] < losses[0][1]  # and it learned
    assert two.stdout.count('"adapter_dir"') == 1  # one report, printed by the launching process
    assert "training on 2 processes" in two.stdout
    assert not list(tmp_path.glob(".two.tmp-*")) and (tmp_path / "two" / "adapter_model.safetensors").exists()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK=")), None)


def test_a_killed_rank_fails_the_launch_and_the_rerun_resumes_its_checkpoint(tmp_path, tiny_model, split):
    out, job = tmp_path / "adapter", tmp_path / "job"
    options = ["--batch-size", "2", "--processes", "2", "--max-steps", "400", "--eval-points", "4",
               "--early-stopping-patience", "0", "--job-dir", str(job)]
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES} | {"FINPIPE_CPU_BF16": "0"}
    command = [sys.executable, "-m", "finpipe.training", "--base", str(tiny_model), "--train", str(split[0]),
               "--val", str(split[1]), "--out", str(out), *SAME_BATCHES, *options]
    first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.time() + 300
    while not list(job.glob("checkpoint-*/trainer_state.json")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    ranks = {_rank_of(pid): pid for pid in _descendants(first.pid)}
    assert 1 in ranks and first.poll() is None, "the training ended before a checkpoint could be interrupted"
    os.kill(ranks[1], signal.SIGKILL)
    output, _ = first.communicate(timeout=120)
    assert first.returncode != 0, output[-2000:]
    assert "rerun to resume" in output
    assert not out.exists()  # no adapter from a dead run
    checkpoints = sorted(int(p.name.split("-")[1]) for p in job.glob("checkpoint-*"))
    assert checkpoints and checkpoints[-1] < 400

    again = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    report = json.loads((out / "training_report.json").read_text())
    assert report["steps"] == 400 and report["processes"] == 2
    assert report["resumed_from"] and Path(report["resumed_from"]).name.startswith("checkpoint-")
    assert int(Path(report["resumed_from"]).name.split("-")[1]) >= checkpoints[0]


def test_torchrun_launched_by_hand_trains_one_adapter_written_once(tmp_path, tiny_model, split):
    """What `accelerate launch --multi_gpu` or torchrun run by a user do: the ranks of one run, whatever --processes."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "finpipe.training", "--base", str(tiny_model), "--train", str(split[0]), "--val", str(split[1]),
               "--out", str(tmp_path / "adapter"), "--quantization", "none", "--max-steps", "2", "--eval-points", "2",
               "--batch-size", "2", "--max-val-samples", "4"]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"adapter_dir"') == 1  # one report, from rank 0
    report = json.loads((tmp_path / "adapter" / "training_report.json").read_text())
    assert report["steps"] == 2 and report["processes"] == 2
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not list(tmp_path.glob(".adapter.tmp-*"))  # no second writer left a half-renamed folder


def test_ranks_outnumbering_the_gpus_share_them_over_gloo(monkeypatch):
    """NCCL refuses two ranks on one GPU ("Duplicate GPU detected", seen on a lent H200: docs/operations.md), so
    there the ranks share the GPU over gloo; with a GPU per rank, or on a CPU, the Trainer keeps its default. The GPU
    count is the outside world here, hence faked."""
    import torch

    from finpipe.training import launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launch.gpus_outnumbered()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert not launch.gpus_outnumbered()  # one GPU each: NCCL
    monkeypatch.setenv("WORLD_SIZE", "4")  # two machines of two ranks and two GPUs each
    assert not launch.gpus_outnumbered()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not launch.gpus_outnumbered()  # CPU ranks: gloo anyway
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert not launch.gpus_outnumbered() and launch.share_gpus_if_outnumbered() is None
