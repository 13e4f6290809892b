"""Pick the device, precision, quantization and gradient checkpointing that pay on the machine at hand, and
say why: the plan is recorded in the adapter's training report, its metadata and the evaluation report.

Measured on this project's CPUs (README, docs/training.md): on a CPU, 4-bit NF4 saves memory but costs time
(dequantization on every matmul), so ``quantization: auto`` trains plain LoRA on CPU and QLoRA on CUDA;
gradient checkpointing costs ~30% of the time to save activation memory, so ``auto`` turns it on only when
the estimated activations would take more than ``CHECKPOINTING_MEMORY_SHARE`` of the memory available.
bf16 is used on CUDA, and on a CPU where it is *measured* faster than fp32 (``runtime.cpu_bf16_pays``: AVX512-BF16
without AMX can be slower), with the frozen base loaded directly in bf16 (no re-cast of fp32 weights on every
autocast forward).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from finpipe import runtime
from finpipe.training import attention as grouped_attention

CHECKPOINTING_MEMORY_SHARE = 0.3


@dataclass(frozen=True)
class DevicePlan:
    device: str  # "cuda" | "cpu"
    compute_dtype: str  # "bfloat16" | "float16" | "float32"
    bf16: bool
    fp16: bool
    optimizer: str  # TrainingArguments.optim
    quantization: str = "none"  # resolved: "nf4" (QLoRA) | "none" (LoRA)
    attention: str = "sdpa"  # attn_implementation for training: eager-style on a CPU in bf16 (see plan_device)
    gradient_checkpointing: bool = False
    note: str = ""
    facts: dict = field(default_factory=dict)  # CPU model and flags, oneDNN kernels, memory estimate, reasons

    def as_dict(self) -> dict:
        return {"device": self.device, "precision": self.compute_dtype, "quantization": self.quantization,
                "attention": self.attention,
                "gradient_checkpointing": self.gradient_checkpointing, "optimizer": self.optimizer,
                "note": self.note, **self.facts}


def available_memory_bytes(device: str) -> int:
    """Free accelerator memory on CUDA; MemAvailable on a CPU (0 when unknown)."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def activation_bytes(model_config, tokens_per_batch: int, seq_len: int, bytes_per_value: int = 2) -> int:
    """A generous estimate of the activations a decoder keeps for the backward pass: per layer and token, about
    16 hidden-size and 3 intermediate-size values, plus the attention probabilities (seq_len per head)."""
    hidden = getattr(model_config, "hidden_size", 0) or 0
    inter = getattr(model_config, "intermediate_size", 4 * hidden) or 4 * hidden
    layers = getattr(model_config, "num_hidden_layers", 0) or 0
    heads = getattr(model_config, "num_attention_heads", 1) or 1
    per_token = (16 * hidden + 3 * inter + heads * seq_len) * bytes_per_value
    return int(layers * tokens_per_batch * per_token)


def plan_device(quantization: str = "auto", gradient_checkpointing: str = "auto", model_config=None,
                tokens_per_batch: int = 0, seq_len: int = 0, prefer_cpu: bool = False) -> DevicePlan:
    import torch

    cuda = runtime.accelerator() == "cuda" and not prefer_cpu
    facts: dict = {}
    if cuda:
        bf16 = runtime.inference_dtype("cuda") == torch.bfloat16  # the same precision choice as inference
        device, dtype, optimizer = "cuda", "bfloat16" if bf16 else "float16", "paged_adamw_8bit"
        facts["gpu"] = torch.cuda.get_device_name(0)
        where = f"CUDA ({facts['gpu']})"
    else:
        bf16 = runtime.cpu_bf16_pays()
        # fused AdamW: one kernel per adapter tensor instead of ~10 small ops each (transformers' own default)
        device, dtype, optimizer = "cpu", "bfloat16" if bf16 else "float32", "adamw_torch_fused"
        facts |= {"cpu": runtime.cpu_model(), "cpu_flags": runtime.cpu_flags(), "threads": torch.get_num_threads()}
        if bf16:
            facts["onednn_bf16_kernels"] = runtime.onednn_bf16_isa()
        forced = os.environ.get("FINPIPE_CPU_BF16") in ("0", "1")
        if forced:
            facts["precision_reason"] = f"set by FINPIPE_CPU_BF16: {'bf16' if bf16 else 'fp32'}"
        elif runtime.cpu_supports_bf16():
            facts["bf16_speedup_vs_fp32"] = runtime.cpu_bf16_speedup()
            facts["precision_reason"] = (
                f"bf16 measured {facts['bf16_speedup_vs_fp32']}x the speed of fp32 on this CPU: "
                + ("bf16" if bf16 else f"fp32 (bf16 needs >= {runtime.BF16_MIN_SPEEDUP}x)"))
        else:
            facts["precision_reason"] = "no native bf16 on this CPU: fp32"
        where = f"CPU ({facts['cpu']}; {', '.join(facts['cpu_flags']) or 'no relevant flags'})"

    if quantization == "auto":
        quantization = "nf4" if cuda else "none"
        facts["quantization_reason"] = ("auto: QLoRA (4-bit NF4 base) on CUDA" if cuda else
                                        "auto: plain LoRA on CPU, where 4-bit saves memory but costs time")
    else:
        facts["quantization_reason"] = f"set: {quantization}"

    if gradient_checkpointing == "auto":
        need = activation_bytes(model_config, tokens_per_batch, seq_len, 2 if bf16 else 4) if model_config else 0
        have = available_memory_bytes(device)
        checkpointing = bool(have) and need > CHECKPOINTING_MEMORY_SHARE * have
        facts["gradient_checkpointing_reason"] = (
            f"auto: estimated activations {need / 2**30:.2f} GiB vs {have / 2**30:.1f} GiB available -> "
            + ("on (memory needs it)" if checkpointing else "off (memory allows; ~30% faster)"))
    else:
        checkpointing = gradient_checkpointing == "on"
        facts["gradient_checkpointing_reason"] = f"set: {gradient_checkpointing}"

    precision = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
    method = "QLoRA (4-bit NF4 base)" if quantization == "nf4" else "LoRA"
    note = (f"{where}: {method}, {precision} compute, gradient checkpointing "
            f"{'on' if checkpointing else 'off'}, {'paged 8-bit AdamW' if cuda else 'AdamW'}")
    # on a CPU, PyTorch's SDPA kernel is slower than plain attention in bf16 and faster in fp32 (docs/training.md);
    # in bf16, eager attention per key/value head group where the architecture's eager attention is Llama's
    # (finpipe.training.attention); on CUDA, SDPA's fused kernels win
    attention = "sdpa" if cuda or dtype == "float32" else \
        grouped_attention.NAME if grouped_attention.supports(model_config) else "eager"
    return DevicePlan(device, dtype, dtype == "bfloat16", dtype == "float16", optimizer, quantization, attention,
                      checkpointing, note, facts)
