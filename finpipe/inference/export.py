"""Merge a LoRA adapter into its base model and write a plain Hugging Face folder.

The result loads with ``AutoModelForCausalLM.from_pretrained(folder)``: no PEFT, no finpipe needed to serve
it. The merge happens on the unquantized base in float32 (an adapter trained through 4-bit QLoRA layers
merges into the full-precision weights it was trained to correct), and the merged weights are saved in
the base checkpoint's own dtype, so the export is the size of the base.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from finpipe.models.files import atomic_dir, folder_size, scratch_dir

EXPORT_MANIFEST = "finpipe_export.json"


@dataclass
class ExportReport:
    path: Path
    size_bytes: int
    dtype: str
    parameters: int


def check_target(out_dir: Path, force: bool, sources: list[Path]) -> frozenset[str]:
    """Refuse to clobber, before any work: a folder this user cannot write into (or immutable), the model being read,
    and a non-empty folder without ``force``. Even with ``force`` only a previous finpipe export is replaced, and only
    when it holds nothing but what its manifest lists: anything else (a user's notes, their benchmarks) is named and
    nothing is deleted. Returns what the previous export's manifest lists (empty without one)."""
    out = out_dir.resolve()
    for source in sources:
        source = source.resolve()
        if out == source or out in source.parents:
            raise ValueError(f"refusing to export into {out_dir}: it holds the model being exported ({source})")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder")
    # the export is built beside the folder (its parent, or the first one that exists) and renamed into place; a
    # replaced export is emptied: both must be writable, checked now rather than after minutes of merging
    parent = next(p for p in out.parents if p.exists())
    for folder in [out, parent] if out.exists() else [parent]:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot export into {out_dir}: {folder} is not writable by this user (its "
                                  "permissions, or the immutable attribute); choose another folder or fix that")
    if not (out.is_dir() and any(out.iterdir())):
        return frozenset()
    if not force:
        raise ValueError(f"{out_dir} is not empty: pass --force to replace a previous finpipe export there")
    if not (out / EXPORT_MANIFEST).exists():
        raise ValueError(f"{out_dir} is not empty and is not a finpipe export (no {EXPORT_MANIFEST}): refusing "
                         f"to replace it even with --force; choose an empty or new folder")
    listed = exported_files(out)
    unexpected = _unlisted(out, listed)
    if unexpected:
        shown = ", ".join(unexpected[:10]) + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else "")
        raise ValueError(f"{out_dir} holds what its finpipe export did not write ({shown}): refusing to replace it "
                         f"even with --force, nothing was deleted; move those out, or export into another folder")
    return listed


def exported_files(folder: Path) -> frozenset[str]:
    """The files an export wrote into ``folder``, as its manifest lists them (relative paths; the manifest itself
    always). A manifest that lists nothing (an older finpipe's) covers only itself; a listed name that is absolute
    or climbs out with ``..`` is not one finpipe wrote, and is never removed."""
    try:
        contents = json.loads((folder / EXPORT_MANIFEST).read_text()).get("contents")
    except (OSError, ValueError, AttributeError):
        contents = None
    listed = {c for c in contents if isinstance(c, str) and c and not Path(c).is_absolute()
              and ".." not in Path(c).parts} if isinstance(contents, list) else set()
    return frozenset(listed | {EXPORT_MANIFEST})


def _unlisted(folder: Path, listed: frozenset[str]) -> list[str]:
    """Entries of ``folder`` that ``listed`` does not cover (a folder none of whose files are listed: by its name)."""
    parents = {p.as_posix() for name in listed for p in Path(name).parents if p != Path(".")}
    unexpected = []
    for root, dirs, files in os.walk(folder):
        here = Path(root).relative_to(folder)
        for d in sorted(dirs):
            if (here / d).as_posix() not in parents:
                unexpected.append(f"{(here / d).as_posix()}/")
        dirs[:] = [d for d in dirs if (here / d).as_posix() in parents]
        unexpected += sorted((here / f).as_posix() for f in files if (here / f).as_posix() not in listed)
    return sorted(unexpected)


def _written(folder: Path) -> list[str]:
    """What an export folder holds now, for its manifest (the manifest itself included)."""
    return sorted({p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()} | {EXPORT_MANIFEST})


def _discard(listed: frozenset[str]) -> Callable[[Path], None]:
    """Removes exactly ``listed`` from the previous export (renamed aside by ``atomic_dir``), then the emptied folders;
    anything else found there (it appeared after the check) is left in that folder, not deleted."""

    def discard(old: Path) -> None:
        for name in listed:
            (old / name).unlink(missing_ok=True)
        for folder in sorted({old / p for name in listed for p in Path(name).parents}, key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                folder.rmdir()

    return discard


def portable(path: str | Path, lake_dir: Path | None = None) -> str:
    """A path as an export records it: relative to the lake when inside it, else the folder's name alone, never
    the exporting machine's absolute layout (a model card is published, a manifest travels with the files)."""
    from finpipe import paths

    path = Path(path).resolve()
    with contextlib.suppress(OSError):
        lake = Path(lake_dir or paths.lake_dir()).resolve()
        if path.is_relative_to(lake):
            return path.relative_to(lake).as_posix()
    return path.name


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
    previous = check_target(out_dir, force, [base_dir, adapter_dir])

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

    with atomic_dir(out_dir, discard_old=_discard(previous)) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        for weights in tmp.glob("*.safetensors"):  # safetensors writes 0600; an export is meant to be shared
            weights.chmod(0o644)
        tokenizer.save_pretrained(tmp)
        manifest = {"base": portable(base_dir), "adapter": portable(adapter_dir),
                    "merged_with": "peft merge_and_unload", "dtype": str(saved_dtype).removeprefix("torch."),
                    "gguf_pre_tokenizer": _source_facts(base_dir).get("gguf_pre_tokenizer")} | (provenance or {})
        manifest["contents"] = _written(tmp)  # what --force may later remove, and nothing else
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        if check_target(out_dir, force, [base_dir, adapter_dir]) != previous:  # changed while the model was merged
            raise ValueError(f"{out_dir} changed during the export: nothing was replaced; run the export again")
    return ExportReport(path=out_dir, size_bytes=folder_size(out_dir), dtype=manifest["dtype"],
                        parameters=merged.num_parameters())


def _source_facts(base_dir: Path) -> dict:
    from finpipe.models.smollm2 import SOURCE_FILE

    path = base_dir / SOURCE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


@dataclass
class GgufExport:
    folder: Path
    files: list  # finpipe.inference.gguf_export.GgufFile
    parity: list  # finpipe.inference.parity.Parity
    seconds: dict[str, float]

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.parity)


def export_gguf(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, name: str,
                outtypes: tuple[str, ...] = ("bf16", "q8_0"), golden: list | None = None, lineage: dict | None = None,
                force: bool = False, log=print) -> GgufExport:
    """The adapter merged into its base and written as GGUF files (one per ``outtypes``), an Ollama Modelfile, a
    model card (README.md) and the parity check of every file against the merged model on ``golden`` (parity.json).
    Written atomically into ``out_dir``; ``force`` replaces only a previous finpipe export."""
    import time

    from finpipe.inference.gguf_export import OUTTYPES, write_gguf
    from finpipe.inference.model_card import model_card
    from finpipe.inference.ollama import modelfile
    from finpipe.inference.parity import check_gguf, check_gguf_with_llama_cpp, llama_cpp_installed

    unknown = [t for t in outtypes if t not in OUTTYPES]
    if unknown or not outtypes:
        raise ValueError(f"GGUF types must be among {', '.join(OUTTYPES)}, got {', '.join(outtypes) or 'none'}")
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    previous = check_target(out_dir, force, [base_dir, adapter_dir])
    seconds: dict[str, float] = {}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir, discard_old=_discard(previous)) as tmp, scratch_dir(out_dir, "merge") as work:
        started = time.perf_counter()
        merged = Path(work) / "merged"
        export_merged(base_dir, adapter_dir, merged)
        seconds["merge"] = round(time.perf_counter() - started, 1)
        files, parity, references = [], [], {}
        for outtype in outtypes:
            started = time.perf_counter()
            written = write_gguf(merged, tmp / f"{name}.{outtype}.gguf", outtype, name,
                                 metadata={"finpipe.run_id": (lineage or {}).get("run_id", "")})
            written.path = out_dir / written.path.name
            files.append(written)
            seconds[f"write_{outtype}"] = round(time.perf_counter() - started, 1)
            log(f"wrote {written.path.name} ({written.size_bytes / 2**20:.1f} MiB) in {seconds[f'write_{outtype}']} s")
            if golden:
                started = time.perf_counter()
                parity.append(check_gguf(tmp / written.path.name, outtype, merged, golden, reference_answers=references,
                                         log=log))
                seconds[f"parity_{outtype}"] = round(time.perf_counter() - started, 1)
                if llama_cpp_installed():  # the engine Ollama and llama.cpp users run the file with
                    started = time.perf_counter()
                    parity.append(check_gguf_with_llama_cpp(tmp / written.path.name, outtype, merged, golden,
                                                            reference_answers=references, log=log))
                    seconds[f"parity_{outtype}_llama_cpp"] = round(time.perf_counter() - started, 1)
        shipped = next((f for f in files if f.outtype == "q8_0"), files[0])
        (tmp / "Modelfile").write_text(modelfile(shipped.path.name))
        rows = [{"file": f.path.name, "outtype": f.outtype, "size_bytes": f.size_bytes} for f in files]
        (tmp / "README.md").write_text(model_card(name, lineage or {}, rows, [p.as_dict() for p in parity],
                                                  (lineage or {}).get("license", LICENSE_NOTE)))
        (tmp / "parity.json").write_text(json.dumps([p.as_dict() for p in parity], indent=2))
        manifest = {"kind": "gguf", "name": name, "base": portable(base_dir), "adapter": portable(adapter_dir),
                    "files": rows, "parity_passed": all(p.passed for p in parity) if parity else None,
                    "seconds": seconds, "contents": _written(tmp)} | {
            k: v for k, v in (lineage or {}).items() if k in ("run_id", "base_name", "status")}
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        if check_target(out_dir, force, [base_dir, adapter_dir]) != previous:  # changed during merge and parity
            raise ValueError(f"{out_dir} changed during the export: nothing was replaced; run the export again")
    return GgufExport(out_dir, files, parity, seconds)


LICENSE_NOTE = ("The base model SmolLM2-135M-Instruct is Apache-2.0 (HuggingFaceTB); the adapter and this export "
                "are Apache-2.0 (finpipe). Training data: Quandl WIKI daily prices (public domain), as shipped in "
                "bokeh-sampledata, or the source recorded in the lineage above.")
