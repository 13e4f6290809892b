"""An adapter merged into its base once, kept as a plain model folder: what `ask` and `chat` load.

Loading the base, applying the adapter with peft and merging it cost every `ask` the import of peft (and, through
it, bitsandbytes and torch's inductor: seconds on 2 cores) and the merge itself. The merged weights depend only
on the base weights and the adapter, so they are written once per adapter, at the inference precision, into
``models/merged/<run id>/`` with a stamp: the SHA-256 of the adapter's weights and config, and the identity of
the base weights (name, size, modification time). A folder whose stamp does not match the adapter it is asked for
is never loaded: it is rebuilt. Only folders carrying finpipe's stamp are ever replaced or removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from finpipe.models.files import atomic_dir, file_digest

STAMP = "finpipe_merged.json"
#: what a merged folder holds; a folder of another layout is rebuilt (2: int8 decode weights beside the model's)
LAYOUT = 2
#: merged folders kept besides the one just written (the previous champion, for a quick switch back)
KEEP = 1


def merged_root(lake_dir: Path) -> Path:
    return Path(lake_dir) / "models" / "merged"


def source_stamp(base_dir: Path, adapter_dir: Path, dtype: str) -> dict:
    """What the merged weights are made of: changes to any of it make a cached folder stale."""
    base_weights = sorted(Path(base_dir).glob("*.safetensors"))
    return {
        "adapter_weights_sha256": file_digest(Path(adapter_dir) / "adapter_model.safetensors"),
        "adapter_config_sha256": file_digest(Path(adapter_dir) / "adapter_config.json"),
        "base": [f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in base_weights],
        "base_name": Path(base_dir).name,
        # the config and the tokenizer (its chat template) are copied into the merged folder: a change is a new one
        "files": {f"{where.name}/{name}": file_digest(where / name) for where in (Path(base_dir), Path(adapter_dir))
                  for name in ("config.json", "tokenizer_config.json", "tokenizer.json") if (where / name).exists()},
        "dtype": dtype,
        "layout": LAYOUT,
    }


def cached(lake_dir: Path, run_id: str, base_dir: Path, adapter_dir: Path, dtype: str) -> Path | None:
    """The merged folder of ``run_id`` if its stamp matches the adapter and base it is asked for, else None."""
    folder = merged_root(lake_dir) / run_id
    try:
        recorded = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return folder if recorded == source_stamp(base_dir, adapter_dir, dtype) else None


def cached_any(lake_dir: Path, run_id: str, base_dir: Path, adapter_dir: Path) -> Path | None:
    """The merged folder of ``run_id`` at whatever precision it was written, if its stamp matches: ``ask`` then
    neither measures this CPU's precision nor merges."""
    try:
        dtype = json.loads((merged_root(lake_dir) / run_id / STAMP).read_text())["dtype"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return cached(lake_dir, run_id, base_dir, adapter_dir, dtype) if isinstance(dtype, str) else None


def build(lake_dir: Path, run_id: str, base_dir: Path, adapter_dir: Path, dtype: str, log=print) -> Path:
    """Merge ``adapter_dir`` into ``base_dir`` at ``dtype`` and write it (weights, config, tokenizer, stamp last) as
    ``models/merged/<run_id>``; older merged folders beyond ``KEEP`` are removed (only finpipe's own)."""
    import torch

    from finpipe.inference import lean
    from finpipe.models.safe_loading import load_causal_lm, load_peft_adapter, load_tokenizer

    stamp = source_stamp(base_dir, adapter_dir, dtype)
    log(f"merging {run_id} into {Path(base_dir).name} once ({dtype}): later answers load it directly")
    model = load_causal_lm(base_dir, dtype=getattr(torch, dtype))
    model = load_peft_adapter(model, adapter_dir).merge_and_unload()
    tokenizer_dir = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").exists() else base_dir
    target = merged_root(lake_dir) / run_id
    if target.exists() and not (target / STAMP).exists():
        raise ValueError(f"{target} exists and was not written by finpipe (no {STAMP}): move it away")
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(tokenizer_dir).save_pretrained(tmp)
        if lean.supports(tmp) is None and dtype in ("bfloat16", "float32"):  # int8 decode is for CPU precisions
            lean.write_int8(tmp)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=1))
    _prune(lake_dir, keep=run_id)
    return target


def _prune(lake_dir: Path, keep: str) -> None:
    others = [p for p in merged_root(lake_dir).iterdir() if p.is_dir() and p.name != keep and (p / STAMP).exists()]
    for old in sorted(others, key=lambda p: (p / STAMP).stat().st_mtime)[:-KEEP or None]:
        shutil.rmtree(old, ignore_errors=True)
