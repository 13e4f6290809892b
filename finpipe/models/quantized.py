"""Guard against the bitsandbytes CPU repacking bug.

bitsandbytes 0.49-0.50 on AVX512-BF16 CPUs repack a ``Linear4bit`` weight on its first no-grad forward
(eval, generate); later backward passes then run a kernel without autograd and LoRA gradients come out
wrong (and out_features % 32 != 0 asserts). finpipe pins 0.48.2, which does not repack; if another
version is installed, turning the flag off on every layer restores the plain path. The test
``test_lora_gradients_are_identical_with_and_without_a_prior_eval_forward`` proves it either way.
"""

from __future__ import annotations


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
