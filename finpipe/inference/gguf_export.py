"""Write a merged Hugging Face Llama-architecture model as GGUF, the file format llama.cpp and Ollama run.

Written with the ``gguf`` package (the one transformers reads GGUF with): the hyperparameters, the byte-level BPE
tokenizer (tokens, types, merges, special ids, chat template) and every tensor under its llama.cpp name, in
``f32``, ``f16``, ``bf16`` or ``q8_0`` (1-D tensors, the norms, always stay f32, as llama.cpp expects).

Two conventions differ between the formats, and both are handled here:
- rotary embeddings: Hugging Face Llama checkpoints rotate the two *halves* of each head's query/key dimensions,
  llama.cpp rotates *adjacent pairs*; the rows of ``q_proj`` and ``k_proj`` are reordered per head so that the
  same model comes out (transformers' GGUF loader undoes exactly this reordering);
- the chat template's ``{% generation %}`` markers (finpipe's, for assistant-only loss) are training-only and are
  removed: a GGUF runtime renders the plain ChatML template.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclass
class GgufFile:
    path: Path
    outtype: str
    size_bytes: int
    tensors: int


def rope_pairs_from_halves(weight, heads: int):
    """Reorder a q/k projection's output rows from the rotate-half layout (HF) to the adjacent-pair layout (GGML):
    within each head, row ``i`` of the first half and row ``i`` of the second half become rows ``2i`` and ``2i+1``."""
    rows = weight.shape[0]
    head_dim = rows // heads
    return weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def plain_chat_template(template: str | None) -> str | None:
    """The chat template without the training-only ``{% generation %}`` / ``{% endgeneration %}`` markers."""
    if template is None:
        return None
    return re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template)


def _token_types(tokenizer_json: dict, vocab_size: int) -> list[int]:
    import gguf

    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    for added in tokenizer_json.get("added_tokens") or []:
        if 0 <= added["id"] < vocab_size:
            types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    return types


def _pre_tokenizer(model_dir: Path) -> str:
    """llama.cpp's pre-tokenizer name: recorded in the base folder when it came from a GGUF (the embedded SmolLM2
    says 'smollm'); 'gpt-2' (byte-level BPE with GPT-2's split; llama.cpp's name for it) otherwise."""
    for name in ("finpipe_source.json", "finpipe_export.json"):
        path = model_dir / name
        if path.exists():
            pre = json.loads(path.read_text()).get("gguf_pre_tokenizer")
            if pre:
                return pre
    return "gpt-2"


def write_gguf(model_dir: str | Path, out_path: str | Path, outtype: str, name: str, chat_template: str | None = None,
               metadata: dict[str, str] | None = None) -> GgufFile:
    """Write ``model_dir`` (a merged, plain HF model folder) as one GGUF file of ``outtype``."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import load_file

    if outtype not in OUTTYPES:
        raise ValueError(f"GGUF type must be one of {OUTTYPES}, got {outtype!r}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF export supports {', '.join(SUPPORTED_ARCHITECTURES)}, not {architecture}")
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    if tokenizer_json["model"]["type"] != "BPE" or (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError("GGUF export supports byte-level BPE tokenizers (GPT-2 style), not "
                         f"{tokenizer_json['model']['type']}")

    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

    writer = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get(
        "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(int(file_type))
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)

    # the tokenizer
    vocab = gguf.vocab.BpeVocab(model_dir)
    tokens = [text for text, _, _ in vocab.all_tokens()]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(model_dir))
    writer.add_token_list(tokens)
    writer.add_token_types(_token_types(tokenizer_json, len(tokens)))
    special = gguf.vocab.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.chat_template = plain_chat_template(chat_template or special.chat_template)
    special.add_to_gguf(writer, quiet=True)

    # the tensors, under llama.cpp's names
    state: dict = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state |= load_file(str(shard))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    tied = config.get("tie_word_embeddings", False)
    count = 0
    for key, tensor in state.items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd for the output when there is no output.weight
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"no GGUF name for tensor {key}: unsupported model layout")
        data = tensor.to(torch.float32)
        if key.endswith("q_proj.weight"):
            data = rope_pairs_from_halves(data, heads)
        elif key.endswith("k_proj.weight"):
            data = rope_pairs_from_halves(data, kv_heads)
        array = data.numpy()
        if array.ndim == 1 or outtype == "f32":
            writer.add_tensor(target, array.astype(np.float32))
        elif outtype == "f16":
            writer.add_tensor(target, array.astype(np.float16))
        else:
            kind = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(target, gguf.quants.quantize(array, kind), raw_dtype=kind)
        count += 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GgufFile(out_path, outtype, out_path.stat().st_size, count)
