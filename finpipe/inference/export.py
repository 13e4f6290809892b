"""Merge a LoRA adapter into its base model and write a plain Hugging Face folder.

The result loads with ``AutoModelForCausalLM.from_pretrained(folder)``: no PEFT, no finpipe needed to serve
it. The merge happens on the unquantized base in float32 (an adapter trained through 4-bit QLoRA layers
merges into the full-precision weights it was trained to correct), and the merged weights are saved in
the base checkpoint's own dtype, so the export is the size of the base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finpipe.models.files import atomic_dir, folder_size

EXPORT_MANIFEST = "finpipe_export.json"


@dataclass
class ExportReport:
    path: Path
    size_bytes: int
    dtype: str
    parameters: int


def _check_target(out_dir: Path, force: bool, sources: list[Path]) -> None:
    """Refuse to clobber: a non-empty folder needs ``force``, and even then only a previous model export
    (a folder with a config.json), never the model being read or an arbitrary folder."""
    out = out_dir.resolve()
    for source in sources:
        source = source.resolve()
        if out == source or out in source.parents:
            raise ValueError(f"refusing to export into {out_dir}: it holds the model being exported ({source})")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{out_dir} is not empty: pass --force to replace it")
        if not ((out / EXPORT_MANIFEST).exists() or (out / "config.json").exists()):
            raise ValueError(f"{out_dir} is not empty and does not look like a model export (no config.json): "
                             f"refusing to replace it even with --force")


def export_merged(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, force: bool = False,
                  provenance: dict | None = None) -> ExportReport:
    """Merge ``adapter_dir`` into ``base_dir`` (``merge_and_unload``) and write the result to ``out_dir``
    atomically: safetensors weights, config, generation config, tokenizer and a small provenance manifest.

    The tokenizer comes from the adapter folder when it has one (training saves it there), else the base's.
    """
    import torch

    from finpipe.models.safe_loading import load_causal_lm, load_peft_adapter, load_tokenizer

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    for folder, what in ((base_dir, "base model"), (adapter_dir, "adapter")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist")
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    _check_target(out_dir, force, [base_dir, adapter_dir])

    # the checkpoint's own dtype, from its config.json (from_pretrained(dtype=float32) overwrites the in-memory one)
    config = json.loads((base_dir / "config.json").read_text()) if (base_dir / "config.json").exists() else {}
    declared = config.get("dtype") or config.get("torch_dtype") or "float32"
    saved_dtype = getattr(torch, declared, None) if isinstance(declared, str) else None
    if not isinstance(saved_dtype, torch.dtype):
        saved_dtype = torch.float32

    base = load_causal_lm(base_dir, dtype=torch.float32, device_map={"": "cpu"})
    merged = load_peft_adapter(base, adapter_dir).merge_and_unload()
    merged = merged.to(saved_dtype)
    merged.eval()
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base_dir
    tokenizer = load_tokenizer(tokenizer_dir)

    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        for weights in tmp.glob("*.safetensors"):  # safetensors writes 0600; an export is meant to be shared
            weights.chmod(0o644)
        tokenizer.save_pretrained(tmp)
        manifest = {"base": str(base_dir), "adapter": str(adapter_dir), "merged_with": "peft merge_and_unload",
                    "dtype": str(saved_dtype).removeprefix("torch.")} | (provenance or {})
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return ExportReport(path=out_dir, size_bytes=folder_size(out_dir), dtype=manifest["dtype"],
                        parameters=merged.num_parameters())
