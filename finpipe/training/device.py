"""Pick the device and precision actually available, and say so."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DevicePlan:
    device: str  # "cuda" | "cpu"
    compute_dtype: str  # "bfloat16" | "float16" | "float32"
    bf16: bool
    fp16: bool
    optimizer: str  # TrainingArguments.optim
    note: str


def cpu_supports_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def plan_device(prefer_cpu: bool = False) -> DevicePlan:
    import torch

    if torch.cuda.is_available() and not prefer_cpu:
        bf16 = torch.cuda.is_bf16_supported()
        return DevicePlan("cuda", "bfloat16" if bf16 else "float16", bf16, not bf16, "paged_adamw_8bit",
                          f"CUDA ({torch.cuda.get_device_name(0)}): {'bf16' if bf16 else 'fp16'} mixed precision, "
                          "paged 8-bit AdamW")
    if cpu_supports_bf16():
        return DevicePlan("cpu", "bfloat16", True, False, "adamw_torch",
                          "CPU with native bf16: bf16 compute, plain AdamW. On CPU 4-bit saves memory, not time.")
    return DevicePlan("cpu", "float32", False, False, "adamw_torch",
                      "CPU without native bf16: fp32 compute, plain AdamW. On CPU 4-bit saves memory, not time.")
