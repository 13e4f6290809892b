"""The one loader of bitsandbytes-quantized models (4-bit NF4 for QLoRA and the compression study, 8-bit LLM.int8()),
and its guard against the bitsandbytes CPU repacking bug.

bitsandbytes 0.49-0.50 on AVX512-BF16 CPUs repack a ``Linear4bit`` weight on its first no-grad forward
(eval, generate); later backward passes then run a kernel without autograd and LoRA gradients come out
wrong (and out_features % 32 != 0 asserts). finpipe pins 0.48.2, which does not repack; if another
version is installed, turning the flag off on every layer restores the plain path. The test
``test_lora_gradients_are_identical_with_and_without_a_prior_eval_forward`` proves it either way.
"""

from __future__ import annotations

from pathlib import Path


def disable_cpu_repacking(model) -> int:
    """Set ``support_avx512bf16_for_cpu = False`` on every 4-bit layer; returns how many were changed."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_quantized_causal_lm(folder: str | Path, bits: int, compute_dtype, **kwargs):
    """A plain model folder loaded with bitsandbytes weights: ``bits`` 4 is NF4 with double quantization computing in
    ``compute_dtype`` (QLoRA's recipe), 8 is LLM.int8(); ``kwargs`` go to ``from_pretrained`` (device_map,
    attention). Safetensors only, no remote code; the CPU repacking guard applied."""
    from transformers import BitsAndBytesConfig

    from finpipe.models.safe_loading import load_causal_lm

    if bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute_dtype)
    elif bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ValueError(f"bits must be 4 (NF4) or 8 (LLM.int8()), got {bits}")
    model = load_causal_lm(folder, dtype=compute_dtype, quantization_config=config, **kwargs)
    if bits == 4:
        disable_cpu_repacking(model)
    return model
