"""Loading checkpoints safely: safetensors weights only, and never code shipped with a model.

A ``pytorch_model.bin`` / ``adapter_model.bin`` / ``*.pt`` checkpoint is a pickle, and unpickling a file can run
arbitrary code: finpipe refuses a folder without safetensors weights instead of falling back to its pickle.
``trust_remote_code`` is always False: a config's ``auto_map`` naming Python files in the folder is ignored when a
built-in architecture matches and refused otherwise. Every model, tokenizer and adapter finpipe loads from disk goes
through these functions.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_LOAD_KWARGS = {"use_safetensors": True, "trust_remote_code": False}
TOKENIZER_LOAD_KWARGS = {"trust_remote_code": False}
SAFE_MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
SAFE_ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class UnsafeCheckpointError(ValueError):
    """A checkpoint finpipe will not load: pickle weights (no safetensors), or a request for remote code."""


def _pickles(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)


def _refuse(folder: Path, expected: str) -> UnsafeCheckpointError:
    found = _pickles(folder)
    what = (f"it only has pickle weights ({', '.join(found)})" if found
            else "it has no weights at all; base_model fetches only *.safetensors weights from the hub")
    return UnsafeCheckpointError(
        f"refusing to load {folder}: no {expected} ({what}). finpipe loads safetensors only, because unpickling "
        "a checkpoint can execute code; convert it to safetensors in a trusted environment first.")


def require_safetensors_model(folder: str | Path) -> Path:
    """``folder`` if it holds safetensors model weights; raises UnsafeCheckpointError otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    config = folder / "config.json"
    if config.exists():  # transformers loads a config-named weights file in preference to model.safetensors
        explicit = json.loads(config.read_text()).get("transformers_weights")
        if explicit and not str(explicit).endswith((".safetensors", ".safetensors.index.json")):
            raise UnsafeCheckpointError(f"refusing to load {folder}: config.json names non-safetensors weights "
                                        f"{explicit!r} (transformers_weights)")
    if not any((folder / name).exists() for name in SAFE_MODEL_WEIGHTS):
        raise _refuse(folder, " or ".join(SAFE_MODEL_WEIGHTS))
    return folder


def require_safetensors_adapter(folder: str | Path) -> Path:
    """``folder`` if it holds a PEFT adapter in safetensors; raises UnsafeCheckpointError otherwise.

    (``PeftModel.from_pretrained`` has no ``use_safetensors`` switch: it falls back to ``adapter_model.bin``.)"""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    if not (folder / SAFE_ADAPTER_WEIGHTS).exists():
        raise _refuse(folder, SAFE_ADAPTER_WEIGHTS)
    return folder


def _safe(kwargs: dict, fixed: dict) -> dict:
    for key, value in fixed.items():
        if key in kwargs and kwargs[key] != value:
            raise UnsafeCheckpointError(f"finpipe loads models with {key}={value}, got {key}={kwargs[key]!r}")
    return kwargs | fixed


def load_causal_lm(folder: str | Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` on a local folder: safetensors only, no remote code."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(require_safetensors_model(folder)),
                                                **_safe(kwargs, MODEL_LOAD_KWARGS))


def load_tokenizer(folder: str | Path, **kwargs):
    """``AutoTokenizer.from_pretrained`` without remote code (tokenizer files are JSON, not pickles)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), **_safe(kwargs, TOKENIZER_LOAD_KWARGS))


def load_peft_adapter(model, folder: str | Path, **kwargs):
    """``PeftModel.from_pretrained(model, folder)`` for a safetensors adapter only."""
    from peft import PeftModel

    from finpipe.runtime import quiet_library_deprecations

    quiet_library_deprecations()  # peft reads transformers' renamed is_gradient_checkpointing for every adapter
    folder = require_safetensors_adapter(folder)
    try:
        return PeftModel.from_pretrained(model, str(folder), **kwargs)
    except Exception as exc:  # safetensors' own error type varies by version: name the file instead
        if "safetensors" in type(exc).__module__.lower() or "header" in str(exc).lower():
            raise UnreadableCheckpointError(
                f"{Path(folder) / SAFE_ADAPTER_WEIGHTS} is not a readable safetensors file ({exc}); the adapter is "
                "corrupt: train it again, or use another run's adapter (finpipe runs)") from exc
        raise


class UnreadableCheckpointError(ValueError):
    """Weights that exist but cannot be read (truncated, overwritten)."""
