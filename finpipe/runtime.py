"""The machine finpipe runs on, in one place: accelerator, CPU model and flags, bf16 support, the oneDNN
kernels bf16 matmuls really use, dtypes for inference, package versions, freeing memory.

Heavy imports (torch) happen inside the functions, so importing this module is instant.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ML_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets")
#: CPU flags that decide finpipe's choices (bf16 compute, AMX tiles) and are worth recording with a number
RELEVANT_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The relevant flags this CPU advertises (``RELEVANT_CPU_FLAGS``), sorted."""
    words = set(_cpuinfo().split())
    return sorted(words & set(RELEVANT_CPU_FLAGS))


def cpu_supports_bf16() -> bool:
    """Native bf16 arithmetic: AVX512-BF16 (AMD Zen 4+, Intel Cooper Lake+) or AMX-BF16 (Intel Sapphire Rapids+)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def accelerator() -> str:
    """'cuda' when a CUDA device is usable, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_dtype(device: str):
    """The fastest precision of the device: bf16 (fp16 on older GPUs) on CUDA; on a CPU, bf16 only where it is
    measured faster than fp32 (``cpu_bf16_pays``), else fp32."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16_pays() else torch.float32


#: bf16 must beat fp32 by this factor to be chosen (a tie is not worth the rounding)
BF16_MIN_SPEEDUP = 1.1


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float | None:
    """fp32 time / bf16 time of a linear layer's forward and backward at a small decoder's shapes (448 tokens,
    576 -> 1536), best of several tries, with this process's threads; None on a CPU without native bf16.

    A flag is not a speed: a CPU with AVX512-BF16 but no AMX can compute bf16 slower than fp32 (docs/training.md).
    Measured once per process (~0.3 s)."""
    if not cpu_supports_bf16():
        return None
    import time

    import torch

    def best(dtype) -> float:
        layer = torch.nn.Linear(576, 1536, dtype=dtype)
        x = torch.randn(448, 576, dtype=dtype, requires_grad=True)
        times = []
        for _ in range(6):
            started = time.perf_counter()
            layer(x).sum().backward()
            times.append(time.perf_counter() - started)
        return min(times[1:])  # the first call pays the kernels' set-up

    return round(best(torch.float32) / best(torch.bfloat16), 3)


def cpu_bf16_pays() -> bool:
    """bf16 is measured faster than fp32 here (``FINPIPE_CPU_BF16=1``/``0`` decides instead)."""
    forced = os.environ.get("FINPIPE_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if not cpu_supports_bf16():
        return False
    speedup = cpu_bf16_speedup()
    return speedup is not None and speedup >= BF16_MIN_SPEEDUP


@functools.lru_cache(maxsize=1)
def onednn_bf16_isa() -> str | None:
    """The instruction set oneDNN's bf16 matmul kernels use on this CPU, read from ``ONEDNN_VERBOSE`` in a child
    process (e.g. ``avx512_core_amx`` on AMX, ``avx512_core_bf16`` on AVX512-BF16); None when unknown."""
    code = ("import torch; a = torch.randn(64, 64, dtype=torch.bfloat16); "
            "torch.nn.functional.linear(a, a)")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env=os.environ | {"ONEDNN_VERBOSE": "1", "OMP_NUM_THREADS": "1"})
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.stdout.splitlines():
        if line.startswith("onednn_verbose") and ",exec," in line and ",matmul," in line:
            found = re.search(r",\w+:((?:avx|amx|sse)\w*)", line)  # e.g. ",brg_matmul:avx512_core_amx,"
            if found:
                return found.group(1)
    return None


def package_versions(names: tuple[str, ...] = ML_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def release_memory() -> None:
    """Free what the previous model left behind (Python garbage, the CUDA cache, glibc's free lists), so the next
    one's resident memory is its own."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- sharing the cores between processes

#: every finpipe process that computes with torch leaves a file here while it lives; each takes its share of the
#: cores (two processes on 2 cores: 1 thread each, instead of 2 each and a 5-30x slowdown from oversubscription)
SHARE_DIR = Path(tempfile.gettempdir()) / "finpipe-cpu-share"
_REBALANCE_EVERY_S = 5.0
_state = {"claimed": False, "checked": 0.0, "threads": 0}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _live_claims() -> int:
    live = 0
    for claim in SHARE_DIR.glob("*.pid"):
        try:
            os.kill(int(claim.stem), 0)
            live += 1
        except (ValueError, ProcessLookupError):
            claim.unlink(missing_ok=True)  # a process that died without cleaning up
        except PermissionError:
            live += 1  # alive, another user's
    return max(1, live)


def claim_cpu_share() -> int:
    """Register this process and set torch's threads to its share of the cores (``FINPIPE_THREADS`` overrides);
    call ``rebalance`` at natural boundaries (a training step, a batch) to follow processes that come and go."""
    import atexit

    if not _state["claimed"]:
        try:
            SHARE_DIR.mkdir(parents=True, exist_ok=True)
            claim = SHARE_DIR / f"{os.getpid()}.pid"
            claim.write_text(" ".join(sys.argv[:3]))
            atexit.register(claim.unlink, missing_ok=True)
        except OSError:
            pass  # an unwritable temp folder: no sharing, torch's defaults
        _state["claimed"] = True
    return rebalance(force=True)


def release_cpu_share() -> None:
    """Give this process's share back while it computes nothing (e.g. it waits on a server it started), so the
    others take the cores."""
    (SHARE_DIR / f"{os.getpid()}.pid").unlink(missing_ok=True)
    _state["claimed"] = False


def cpu_share() -> int:
    """This process's share of the cores now (``FINPIPE_THREADS`` overrides), without touching torch: the threads an
    engine other than torch (llama.cpp) is given."""
    fixed = os.environ.get("FINPIPE_THREADS")
    return int(fixed) if fixed and fixed.isdigit() and int(fixed) > 0 else max(1, usable_cores() // _live_claims())


def rebalance(force: bool = False) -> int:
    """Re-count the finpipe processes (at most every few seconds) and set this one's torch threads."""
    import time

    import torch

    now = time.monotonic()
    if not force and now - _state["checked"] < _REBALANCE_EVERY_S:
        return _state["threads"]
    _state["checked"] = now
    threads = cpu_share()
    if threads != _state["threads"]:
        torch.set_num_threads(threads)
        _state["threads"] = threads
    return threads


def quiet_library_deprecations() -> None:
    """No FutureWarnings that transformers, peft or TRL raise about their own internals (TRL reading a renamed
    transformers property, say): nothing a finpipe user can act on, printed in the middle of a run. finpipe's own
    calls use the current names."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|trl)(\.|$)")


@contextlib.contextmanager
def heartbeat(log, what: str, every_s: float = 15.0):
    """Say every ``every_s`` seconds that ``what`` is still running, for steps whose work gives no progress of its own
    (a conversion, an upsert, a validation): a console silent for a minute looks hung."""
    import threading

    started, stop = time.monotonic(), threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                log(f"{what}: still working ({time.monotonic() - started:.0f} s)")
            except Exception:  # noqa: BLE001 - a progress line must never break the step
                return

    thread = threading.Thread(target=beat, name="finpipe-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)
