"""What every benchmark shares: the machine record, the results file, the printed table, the lake's models.

Each benchmark is ``python -m benchmarks.<name> [--quick] [--json PATH]``: it prints a table, writes a JSON
(default ``benchmarks/results/<name>.json``, git-ignored) and its ``main(argv)`` returns the same dict, so the
quick mode runs in-process in the test suite (finpipe_tests/test_benchmarks_quick.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from finpipe import runtime
from finpipe.runtime import ML_PACKAGES

RESULTS_DIR = Path(__file__).parent / "results"
PACKAGES = (*ML_PACKAGES, "polars", "duckdb", "numpy", "pyarrow")  # the versions a result records


def runtime_versions() -> dict[str, str | None]:
    return runtime.package_versions(PACKAGES)


def _git() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{head}{'+dirty' if dirty else ''}" if head else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(torch_needed: bool = True) -> dict[str, Any]:
    """CPU model, cores, threads, accelerator, versions and the load average now (call again at the end)."""
    info: dict[str, Any] = {
        "cpu": runtime.cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "git": _git(),
        "versions": runtime_versions(),
        "load_avg_before": [round(x, 2) for x in os.getloadavg()],
    }
    info["cpu_features"] = runtime.cpu_flags()
    info["cpu_bf16"] = runtime.cpu_supports_bf16()
    if info["cpu_bf16"] and torch_needed:
        info["onednn_bf16_kernels"] = runtime.onednn_bf16_isa()  # e.g. avx512_core_amx where AMX really runs
    if torch_needed:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def finish(name: str, result: dict[str, Any], json_path: str | Path | None, table: str) -> dict[str, Any]:
    """Add the closing load average, print ``table`` and write the JSON; returns ``result``."""
    result["machine"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    path = Path(json_path) if json_path else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['cores_usable']}/{m['cores']} cores"
          + (f", torch threads {m['torch_threads']}" if "torch_threads" in m else "")
          + (f", CUDA {m['cuda']}" if m.get("cuda") else "")
          + f"; load average {m['load_avg_before'][0]} before, {m['load_avg_after'][0]} after")
    print(table)
    print(f"written {path}")
    result["json_path"] = str(path)
    return result


def format_table(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    rows = list(rows)

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v != 0 and abs(v) < 1e-3:
                return f"{v:.1e}"
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
              for row in cells]
    return "\n".join(lines)


class Timer:
    def __enter__(self) -> "Timer":
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started


# --------------------------------------------------------------------------- models and data for the ML benchmarks

def lake_base_model() -> Path | None:
    """The lake's converted base model folder (FINPIPE_LAKE_DIR or the repo's data_lake), read-only; None if absent."""
    from finpipe.models import registry
    from finpipe.paths import lake_dir

    try:
        folder = Path(registry.read_pointer(registry.base_pointer(lake_dir()))["path"])
    except (FileNotFoundError, KeyError, ValueError):
        return None
    return folder if (folder / "config.json").exists() else None


def lake_champion_adapter() -> Path | None:
    from finpipe.models import registry
    from finpipe.paths import lake_dir

    try:
        folder = Path(registry.read_pointer(registry.champion_pointer(lake_dir()))["path"])
    except (FileNotFoundError, KeyError, ValueError):
        return None
    return folder if (folder / "adapter_config.json").exists() else None


def lake_split():
    """(train, val) from the lake's dataset split files, or None."""
    from finpipe.instructions.samples import read_jsonl
    from finpipe.paths import DatasetFiles, lake_dir

    files = DatasetFiles.of(lake_dir())
    if not (files.train.exists() and files.val.exists()):
        return None
    return read_jsonl(files.train), read_jsonl(files.val)


def builtin_split(date_stride: int = 1):
    """(train, val): grounded samples built from the offline replay data (2011-03-01 .. 2013-03-01)."""
    from finpipe.instructions.offline import offline_samples
    from finpipe.instructions.split import SplitSpec, temporal_split

    split = temporal_split(offline_samples(date_stride=date_stride), SplitSpec(val_fraction=0.2))
    return split.train, split.val


def sample_texts(samples) -> list[str]:
    return [f"{s.text_of('user')}\n{s.text_of('assistant')}" for s in samples]


@contextlib.contextmanager
def baseline_worktree(rev: str, where: Path):
    """A detached git worktree of ``rev`` at ``where`` (for a baseline measured against this tree), removed after."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=root, check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=root, capture_output=True)


@contextlib.contextmanager
def quiet_session(threads: int | None = None):
    """For one benchmark run: ``threads`` torch intra-op threads (None = leave as is), no progress bars or info logs
    from datasets / transformers, no FutureWarnings; everything restored afterwards (the quick modes run inside the
    test process)."""
    import warnings

    restore = []
    try:
        import torch

        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        restore.append(lambda: torch.set_num_threads(before))
    except ImportError:
        pass
    try:
        import datasets

        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            restore.append(datasets.enable_progress_bars)
    except (ImportError, AttributeError):
        pass
    try:
        from transformers.utils import logging as hf_logging

        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        restore.append(lambda: hf_logging.set_verbosity(verbosity))
        if bars:
            restore.append(hf_logging.enable_progress_bar)
    except ImportError:
        pass
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # third-party deprecation notices
            yield
    finally:
        for undo in reversed(restore):
            undo()


@contextlib.contextmanager
def captured_stdout(verbose: bool):
    """Swallow the trainers' printed log dicts unless ``verbose``."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class MemoryWindow:
    """Peak memory of one variant: VmRSS above its start (CPU) or max_memory_allocated (CUDA)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self) -> "MemoryWindow":
        runtime.release_memory()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        from finpipe.training.memory import RssPeak

        self._rss = RssPeak().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._rss.__exit__(*exc)
        if self.cuda:
            import torch

            self.mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.mb = self._rss.delta_mb
