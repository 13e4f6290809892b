"""Weight-only int8 for CPU decoding: the linear layers read int8 weights while generating one token at a time.

Why: generating one answer reads every weight once per token, and on a small CPU that read, not arithmetic, is the
cost (SmolLM2-135M in bf16 is 268 MB per token; on the 2-core AMD EPYC a decode step took 48 ms, about 5.6 GB/s).
int8 halves the bytes, and PyTorch's ``_weight_int8pack_mm`` (int8 weights, one bf16/fp32 scale per output row)
multiplies a few rows 2.3x faster than a bf16 matmul at SmolLM2's shapes. For many rows (a prompt's prefill, a
batch of 70 evaluation answers) the same kernel is several times *slower* than the bf16 GEMM, so each layer keeps
its original weight and uses it above ``max_rows``: prompts are prefilled exactly as without int8, and only the
decode steps of small batches are approximated.

Symmetric per-output-row quantization: ``scale = max|w| / 127``, ``q = round(w / scale)``. The answers are not
bit-identical to bf16 (a different precision): ``benchmarks.inference`` reports how many greedy answers equal the
bf16 ones and the strict golden metrics of both.
"""

from __future__ import annotations

#: decode steps with at most this many rows (sequences) use the int8 weights; above it the kernel is slower than
#: the bf16 GEMM (measured on the 2-core AMD EPYC: equal at 8 rows, 2.3x slower at 70)
DEFAULT_MAX_ROWS = 4


def int8_decode_linear_class():
    import torch

    class Int8DecodeLinear(torch.nn.Module):
        """A frozen ``nn.Linear`` that multiplies small batches with int8 weights and large ones with the original."""

        def __init__(self, linear: torch.nn.Linear, max_rows: int = DEFAULT_MAX_ROWS):
            super().__init__()
            weight = linear.weight.detach()
            scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
            self.register_buffer("qweight", torch.round(weight.float() / scale[:, None]).clamp(-127, 127)
                                 .to(torch.int8).contiguous(), persistent=False)
            self.register_buffer("scales", scale.to(weight.dtype), persistent=False)
            self.weight = linear.weight  # shared, not copied: the prefill path and tied embeddings keep it
            self.bias = linear.bias
            self.in_features, self.out_features, self.max_rows = linear.in_features, linear.out_features, max_rows

        def forward(self, x):
            rows = x.numel() // x.shape[-1]
            if rows > self.max_rows or x.dtype != self.scales.dtype or x.requires_grad:
                return torch.nn.functional.linear(x, self.weight, self.bias)
            out = torch._weight_int8pack_mm(x.reshape(rows, x.shape[-1]), self.qweight, self.scales)
            out = out.reshape(*x.shape[:-1], self.out_features)
            return out + self.bias if self.bias is not None else out

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, int8 up to {self.max_rows} rows"

    return Int8DecodeLinear


def supports_int8_decode(model) -> bool:
    """Whether ``model`` can decode with int8 weights here: on a CPU, with fp32 or bf16 weights."""
    import torch

    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    param = next(model.parameters())
    return param.device.type == "cpu" and param.dtype in (torch.float32, torch.bfloat16)


def enable_int8_decode(model, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Replace every ``nn.Linear`` of an (already merged) causal LM by an ``Int8DecodeLinear``, the output head
    included; returns how many were replaced. Inference only: the replaced layers are frozen."""
    import torch

    if not supports_int8_decode(model):
        raise ValueError("int8 decoding needs a CPU model with fp32 or bf16 weights "
                         f"(got {next(model.parameters()).device.type}, {next(model.parameters()).dtype})")
    cls = int8_decode_linear_class()
    targets = [(name, module) for name, module in model.named_modules() if type(module) is torch.nn.Linear]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cls(module, max_rows))
    model.requires_grad_(False)
    return len(targets)


def uses_int8_decode(model) -> bool:
    """Whether ``enable_int8_decode`` was applied to ``model``."""
    return any(type(m).__name__ == "Int8DecodeLinear" for m in model.modules())
