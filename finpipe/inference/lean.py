"""A lean chat model for ``ask`` and ``chat``: a merged Llama-family model decoded with plain torch, no transformers.

Why: a cold ``finpipe ask`` spent most of its time importing transformers and peft (seconds on 2 cores) for an
answer generated in about 1.5 s. A merged champion (``finpipe.models.merged``) is a plain decoder whose forward pass
is a few dozen lines; with ``tokenizers`` (Rust, instant) for the tokens and jinja2 for the chat template, ``ask``
imports torch and nothing heavier, loads the weights from safetensors and the int8 decode weights written once
beside them, and decodes with a static KV cache.

The arithmetic mirrors transformers' ``LlamaForCausalLM`` (SDPA attention) with finpipe's int8 decode steps
(``finpipe.models.int8_decode``) op for op, in the same order and dtypes, so a greedy answer is the same text as
the transformers path (``test_lean_decoder``); architectures it does not mirror (``supports`` says which) are
answered through transformers as before.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from finpipe.evaluation.generation import Generated, Sampling
from finpipe.inference.drafting import PromptLookup
from finpipe.models.int8_decode import DEFAULT_MAX_ROWS

#: query rows of every decode step: a token and up to three drafts (``finpipe.inference.drafting``); a step with
#: fewer is padded, so a token's arithmetic is the same whether drafts came with it or not. Four, as the int8
#: kernel's time is nearly flat up to 4 rows and doubles above (``docs/benchmarks.md``)
DECODE_ROWS = 4
#: a decode step attends over whole blocks of this many key positions (later ones masked), for the same reason
KEY_BLOCK = 64
#: int8 decode weights written beside a merged model's own (``write_int8``): one int8 matrix and one scale per
#: output row for every linear layer, so answering never quantizes
INT8_FILE = "finpipe_int8_decode.safetensors"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def supports(folder: Path) -> str | None:
    """None if the model in ``folder`` can be decoded here; else why not (it is answered through transformers)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"no readable config.json ({exc})"
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    checks = {
        "model_type is not 'llama'": config.get("model_type") != "llama",
        "rope scaling other than the default": (rope.get("rope_type") or rope.get("type") or "default") != "default",
        "attention or MLP biases": bool(config.get("attention_bias") or config.get("mlp_bias")),
        "an activation other than silu": config.get("hidden_act", "silu") != "silu",
        "no single model.safetensors": not (Path(folder) / "model.safetensors").exists(),
        "no tokenizer.json": not (Path(folder) / "tokenizer.json").exists(),
    }
    problems = [why for why, failed in checks.items() if failed]
    return "; ".join(problems) or None


# --------------------------------------------------------------------------------------------------- the tokenizer

class ChatTokenizer:
    """``tokenizers`` plus the folder's chat template, as transformers applies them: the template rendered by jinja2
    (``trim_blocks``, ``lstrip_blocks``; ``{% generation %}`` marks are transparent), encoded without added special
    tokens, decoded skipping special tokens."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else config.get("chat_template")
        if not isinstance(template, str):
            raise ValueError(f"{folder} has no chat template (chat_template.jinja or tokenizer_config.json)")
        self._template = _compile_template(template)
        self.specials = {name: config.get(name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    def stop_ids(self) -> list[int]:
        """End-of-turn and end-of-sequence, as ``finpipe.evaluation.generation.stop_token_ids``."""
        from finpipe.models.chat_template import IM_END

        unk = self.token_id(self.specials["unk_token"])
        ids = {self.token_id(self.specials["eos_token"]), self.token_id(IM_END)}
        return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != unk)

    def prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.specials)

    def encode(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self._tokenizer.encode(self.prompt(messages, add_generation_prompt), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def _compile_template(source: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}…{% endgeneration %}`` (TRL's assistant-token marks) renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


# ------------------------------------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class LlamaShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    context: int

    @classmethod
    def of(cls, config: dict) -> "LlamaShape":
        heads = config["num_attention_heads"]
        rope = config.get("rope_parameters") or {}
        return cls(layers=config["num_hidden_layers"], hidden=config["hidden_size"], heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   eps=config.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", config.get("rope_theta",
                                                                                                    10000.0)),
                   context=int(config.get("max_position_embeddings") or 2048))


class LeanLlama:
    """Weights in a dict, a forward pass over a static KV cache; inference only.

    Decode steps (a token, and up to three drafts checked with it) are where an answer's time goes, so they take
    three shortcuts. Two change no number: the int8 q/k/v and gate/up matrices are concatenated at load (one kernel
    call instead of three and two, the same per-row products), and the rotary table is computed once. The third,
    the attention over the cache as two small fp32 matmuls (PyTorch's CPU flash kernel's arithmetic without its
    per-call set-up, ~130 µs a layer) on fixed shapes (``_attend_decode``), sums in another order: the logits move
    in their last bits, and a near tie between two tokens can go the other way (``benchmarks.answer_parity`` counts
    the answers that changed). The cache is kept in fp32 so those matmuls read it directly.
    """

    def __init__(self, folder: Path, int8: bool, max_rows: int = DEFAULT_MAX_ROWS):
        import torch
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        self.shape = LlamaShape.of(config)
        self.config = config
        self.w = load_file(str(folder / "model.safetensors"))
        if "lm_head.weight" not in self.w:  # tied embeddings: the head is the embedding matrix
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        self.dtype = self.w["model.embed_tokens.weight"].dtype
        self.max_rows = max_rows
        self.q: dict[str, tuple] = {}
        if int8:
            self.q = _fused(load_int8(folder) if (folder / INT8_FILE).exists() else quantize_int8(self.w),
                            self.shape.layers)
        # the inverse frequencies exactly as transformers' default rotary embedding computes them
        dim = self.shape.head_dim
        self.inv_freq = 1.0 / (self.shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self._cos = self._sin = torch.empty(1, 0, dim, dtype=self.dtype)

    @property
    def int8(self) -> bool:
        return bool(self.q)

    def _int8(self, name: str, x):
        """The int8 matrix ``name`` for ``x`` when it applies (``Int8DecodeLinear``'s rule: at most ``max_rows``
        rows of the weights' dtype), else None."""
        rows = x.numel() // x.shape[-1]
        entry = self.q.get(name)
        return entry if entry is not None and rows <= self.max_rows and x.dtype == entry[1].dtype else None

    def _linear(self, name: str, x):
        """``Int8DecodeLinear``: int8 weights for at most ``max_rows`` rows, the original weight above."""
        import torch

        if (entry := self._int8(name, x)) is not None:
            qweight, scales = entry
            out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), qweight, scales)
            return out.reshape(*x.shape[:-1], qweight.shape[0])
        return torch.nn.functional.linear(x, self.w[name + ".weight"])

    def _norm(self, name: str, x):
        import torch

        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.shape.eps)
        return self.w[name + ".weight"] * x.to(dtype)

    def _rotary(self, positions):
        import torch

        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _rope(self, start: int, n: int):
        """cos and sin of positions ``start .. start + n`` (1 × 1 × n × head_dim), from a table grown on demand:
        each element is computed as ``_rotary`` computes it, so the values are the same."""
        import torch

        if start + n > self._cos.shape[1]:
            self._cos, self._sin = self._rotary(torch.arange(max(start + n, 2 * self._cos.shape[1], 256)).unsqueeze(0))
        return self._cos[:, start:start + n].unsqueeze(1), self._sin[:, start:start + n].unsqueeze(1)

    def _rotate(self, x, cos, sin):
        import torch

        half = self.shape.head_dim // 2
        return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)

    def _qkv(self, p: str, h, n: int, cos, sin):
        """Queries, keys and values (1 × heads × n × head_dim), rotary applied to queries and keys."""
        s = self.shape
        if self._int8(p + "qkv", h) is not None:  # the fused matrix, then split: (1 × n × (heads + 2 kv) · d)
            out = self._linear(p + "qkv", h)
            split = (s.heads + s.kv_heads) * s.head_dim
            rotated = self._rotate(out[..., :split].view(1, n, -1, s.head_dim).transpose(1, 2), cos, sin)
            v = out[..., split:].view(1, n, -1, s.head_dim).transpose(1, 2)
            return rotated[:, :s.heads], rotated[:, s.heads:], v
        q, k, v = (self._linear(p + f"self_attn.{x}_proj", h).view(1, n, -1, s.head_dim).transpose(1, 2)
                   for x in "qkv")
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin), v

    def _mlp(self, p: str, h):
        import torch.nn.functional as F

        if self._int8(p + "gate_up", h) is not None:
            gate, up = self._linear(p + "gate_up", h).chunk(2, dim=-1)
            return self._linear(p + "mlp.down_proj", F.silu(gate) * up)
        return self._linear(p + "mlp.down_proj", F.silu(self._linear(p + "mlp.gate_proj", h))
                            * self._linear(p + "mlp.up_proj", h))

    def _attend(self, q, keys, values, start: int, n: int):
        """A prompt's attention (``q``: 1 × heads × n × d) over the cache's first ``start + n`` positions, as
        transformers calls PyTorch's kernel: (1 × n × heads·d). ``is_causal`` aligns its mask with key 0: from a
        later start (the rest of a prompt after its system turn), each query's own mask."""
        import torch
        import torch.nn.functional as F

        s = self.shape

        mask = None if not start else torch.ones(n, start + n, dtype=torch.bool).tril(diagonal=start)
        attn = F.scaled_dot_product_attention(q, keys[:, :, :start + n].to(q.dtype),
                                              values[:, :, :start + n].to(q.dtype), attn_mask=mask,
                                              scale=s.head_dim ** -0.5, is_causal=not start, enable_gqa=True)
        return attn.transpose(1, 2).reshape(1, n, -1)

    def _decode_mask(self, start: int, n: int):
        """What every layer's decode attention shares: the key length (the block holding all ``n`` positions) and
        the additive mask (0, or -inf on each row's later keys), for ``DECODE_ROWS`` rows."""
        import torch

        end = -(-(start + n) // KEY_BLOCK) * KEY_BLOCK
        if n > DECODE_ROWS or start // KEY_BLOCK != (start + n - 1) // KEY_BLOCK:
            raise ValueError(f"a decode step is at most {DECODE_ROWS} positions within one block of {KEY_BLOCK}; "
                             f"got {n} from {start}")
        position = torch.arange(start, start + DECODE_ROWS).clamp(max=start + n - 1)  # padding rows: the last one's
        mask = torch.zeros(DECODE_ROWS, end).masked_fill_(torch.arange(end) > position[:, None], float("-inf"))
        return end, mask

    def _attend_decode(self, q, keys, values, n: int, end: int, mask):
        """A decode step's attention, the same arithmetic for a token whether it is checked alone or with drafts
        (``finpipe.inference.drafting``): every step computes ``DECODE_ROWS`` query rows (the unused ones padded)
        over the keys of the whole block of ``KEY_BLOCK`` positions (later keys masked, weighing exactly 0), so
        each kernel always sees the same shapes and a row's numbers do not depend on its neighbours. Otherwise as
        PyTorch's CPU flash kernel computes it (fp32 scores, max-shifted exponentials rounded to the model's dtype
        for the second product, normalised at the end), each query head grouped with its key/value head."""
        import torch

        s = self.shape
        group = s.heads // s.kv_heads
        if n < DECODE_ROWS:
            q = torch.cat([q, q[:, :, -1:].expand(1, s.heads, DECODE_ROWS - n, s.head_dim)], dim=2)
        k, v = keys[0, :, :end], values[0, :, :end]
        grouped = q[0].reshape(s.kv_heads, group * DECODE_ROWS, s.head_dim).float()
        scores = torch.matmul(grouped, k.transpose(1, 2)).mul_(s.head_dim ** -0.5).view(s.kv_heads, group,
                                                                                        DECODE_ROWS, end)
        scores = scores.add_(mask)
        weights = (scores - scores.amax(-1, keepdim=True)).exp_().view(s.kv_heads, group * DECODE_ROWS, end)
        out = torch.matmul(weights.to(q.dtype).float(), v) / weights.sum(-1, keepdim=True)
        return out.to(q.dtype).view(s.heads, DECODE_ROWS, s.head_dim)[:, :n].transpose(0, 1).reshape(1, n, -1)

    def rows_differ(self) -> str | None:
        """Why a decode step's rows would not each get the numbers they get alone on this CPU (a kernel whose
        result for a row depends on the other rows), or None. Drafting is exact only where this is None: the int8
        (or full-precision) matrices are run on 4 rows and on each row alone, and the decode attention with each
        query in every row slot. The kernels are PyTorch's; which code path they take depends on the CPU."""
        import torch

        s = self.shape
        generator = torch.Generator().manual_seed(0)
        names = ["model.layers.0.qkv" if "model.layers.0.qkv" in self.q else "model.layers.0.self_attn.q_proj",
                 "model.layers.0.self_attn.o_proj",
                 "model.layers.0.gate_up" if "model.layers.0.gate_up" in self.q else "model.layers.0.mlp.up_proj",
                 "model.layers.0.mlp.down_proj", "lm_head"]
        with torch.inference_mode():
            for name in names:
                columns = (self.q[name][0] if name in self.q else self.w[name + ".weight"]).shape[1]
                x = torch.randn(1, DECODE_ROWS, columns, generator=generator).to(self.dtype)
                together = self._linear(name, x)
                if not all(torch.equal(together[:, i], self._linear(name, x[:, i:i + 1])[:, 0])
                           for i in range(DECODE_ROWS)):
                    return f"the {name.rsplit('.', 1)[-1]} matrix gives a row other numbers next to other rows"
            keys, values = (torch.randn(1, s.kv_heads, 4 * KEY_BLOCK, s.head_dim, generator=generator)
                            for _ in range(2))
            for start in (1, KEY_BLOCK + 13, 2 * KEY_BLOCK + 27, 3 * KEY_BLOCK + 41):  # several key lengths
                q = torch.randn(1, s.heads, DECODE_ROWS, s.head_dim, generator=generator).to(self.dtype)
                together = self._attend_decode(q, keys, values, DECODE_ROWS, *self._decode_mask(start, DECODE_ROWS))
                for i in range(DECODE_ROWS):
                    alone = self._attend_decode(q[:, :, i:i + 1], keys, values, 1, *self._decode_mask(start + i, 1))
                    if not torch.equal(together[:, i], alone[:, 0]):
                        return "the decode attention gives a query other numbers in another row"
        return None

    def new_cache(self, length: int):
        """Keys and values for at least ``length`` positions (whole blocks; see ``_attend_decode``) for every layer,
        in fp32 (see the class's note), zeroed: a masked key weighs exactly 0 only if its value is finite."""
        import torch

        s = self.shape
        length = -(-length // KEY_BLOCK) * KEY_BLOCK
        return [(torch.zeros(1, s.kv_heads, length, s.head_dim, dtype=torch.float32),
                 torch.zeros(1, s.kv_heads, length, s.head_dim, dtype=torch.float32)) for _ in range(s.layers)]

    def forward(self, ids, start: int, cache, every: bool = False, prompt: bool = False):
        """Logits (fp32) of the last position of ``ids`` (1 × n; of every position, n × vocabulary, with ``every``),
        whose first token sits at ``start``; the keys and values of positions ``start .. start + n`` are written
        into ``cache``. A decode step unless ``start`` is 0 or ``prompt`` (the rest of a prompt after its cached
        system turn)."""
        import torch.nn.functional as F

        s = self.shape
        n = ids.shape[1]
        x = F.embedding(ids, self.w["model.embed_tokens.weight"])
        cos, sin = self._rope(start, n)
        decode = None if prompt or not start else self._decode_mask(start, n)  # shared by every layer
        for i in range(s.layers):
            p = f"model.layers.{i}."
            residual = x
            q, k, v = self._qkv(p, self._norm(p + "input_layernorm", x), n, cos, sin)
            keys, values = cache[i]
            keys[:, :, start:start + n] = k
            values[:, :, start:start + n] = v
            attn = (self._attend(q, keys, values, start, n) if decode is None
                    else self._attend_decode(q, keys, values, n, *decode))
            x = residual + self._linear(p + "self_attn.o_proj", attn)
            residual = x
            x = residual + self._mlp(p, self._norm(p + "post_attention_layernorm", x))
        if every:
            return self._linear("lm_head", self._norm("model.norm", x))[0].float()
        x = self._norm("model.norm", x[:, -1:])
        return self._linear("lm_head", x)[:, -1].float()


def _fused(q: dict[str, tuple], layers: int) -> dict[str, tuple]:
    """Each layer's int8 q/k/v and gate/up matrices (and scales) concatenated by rows, as ``<layer>.qkv`` and
    ``<layer>.gate_up``: a row's product does not depend on its neighbours, so the outputs are the same numbers."""
    import torch

    groups = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "gate_up": ("mlp.gate_proj", "mlp.up_proj")}
    for i in range(layers):
        p = f"model.layers.{i}."
        for fused, names in groups.items():
            parts = [q.pop(p + name) for name in names]
            q[p + fused] = (torch.cat([w for w, _ in parts]).contiguous(), torch.cat([s for _, s in parts]))
    return q


def quantize_int8(weights: dict) -> dict[str, tuple]:
    """Per-output-row symmetric int8 of every linear layer, exactly as ``Int8DecodeLinear`` computes it."""
    import torch

    out = {}
    for name, weight in weights.items():
        stem = name.removesuffix(".weight")
        if not (name == "lm_head.weight" or (name.endswith(".weight") and stem.split(".", 3)[-1] in LINEARS)):
            continue
        scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        out[stem] = (q, scale.to(weight.dtype))
    return out


def write_int8(folder: Path) -> Path:
    """Quantize a merged model's linear layers once and save them beside its weights (``INT8_FILE``)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(Path(folder) / "model.safetensors"))
    if "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    tensors = {}
    for stem, (q, scale) in quantize_int8(weights).items():
        tensors[f"{stem}.qweight"], tensors[f"{stem}.scales"] = q, scale
    target = Path(folder) / INT8_FILE
    save_file(tensors, str(target))
    return target


def load_int8(folder: Path) -> dict[str, tuple]:
    from safetensors.torch import load_file

    tensors = load_file(str(Path(folder) / INT8_FILE))
    # copied into fresh (64-byte aligned) memory: safetensors' tensors sit at 8-byte offsets in the file's buffer,
    # and PyTorch's int8 kernel for 4 rows or more crashed (SIGSEGV) on such a matrix (torch 2.13, AVX-512)
    return {stem.removesuffix(".qweight"): (q.clone(), tensors[stem.removesuffix(".qweight") + ".scales"].clone())
            for stem, q in tensors.items() if stem.endswith(".qweight")}


# ------------------------------------------------------------------------------------------------------ generating

class LeanChatModel:
    """What ``ask`` and ``chat`` need of a chat model: ``generate(messages, sampling)`` and the context check."""

    def __init__(self, folder: Path, int8: bool, draft_tokens: int = DECODE_ROWS - 1):
        self.folder = Path(folder)
        self.tokenizer = ChatTokenizer(self.folder)
        self.model = LeanLlama(self.folder, int8=int8)
        self.stops = set(self.tokenizer.stop_ids())
        # greedy answers are decoded speculatively from looked-up drafts (``finpipe.inference.drafting``): as many as
        # a decode step has rows for, all on the int8 kernel if any, and only where this CPU's kernels give each row
        # the numbers it gets alone (then drafting changes no answer); 0: never
        self.draft_tokens = min(draft_tokens, DECODE_ROWS - 1, self.model.max_rows - 1 if int8 else DECODE_ROWS)
        self.no_drafts = self.model.rows_differ() if self.draft_tokens else None
        if self.no_drafts:
            self.draft_tokens = 0
        self.lookup = PromptLookup()
        self.drafting = {"passes": 0, "drafted": 0, "kept": 0}  # decode passes, draft tokens checked and kept
        self._system: tuple[list[int], list] | None = None  # the last system turn's tokens, keys and values

    @property
    def context(self) -> int:
        return self.model.shape.context

    @property
    def weights(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    def prompt(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.prompt(messages)

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.tokenizer.encode(messages))

    def generate(self, messages: list[dict[str, str]], sampling: Sampling = Sampling()) -> Generated:
        """One answer, as ``finpipe.evaluation.generation.generate`` produces it: greedy at temperature 0 (argmax of
        the fp32 logits), else repetition penalty, temperature and top-p as transformers applies them."""
        new: list[int] = []
        started = time.perf_counter()
        prefill_s = None
        for token in self.tokens(messages, sampling):
            new.append(token)
            prefill_s = prefill_s or time.perf_counter() - started
            if token in self.stops or len(new) >= sampling.max_new_tokens or (
                    sampling.max_time_s is not None and time.perf_counter() - started > sampling.max_time_s):
                break
        seconds = time.perf_counter() - started
        return Generated(text=self.tokenizer.decode(new).strip(), new_tokens=len(new), seconds=seconds,
                         prefill_s=prefill_s)

    def tokens(self, messages: list[dict[str, str]], sampling: Sampling = Sampling()):
        """The answer's token ids, one at a time, for as long as the caller asks (stops, limits and cancellation are
        the caller's; the cache holds ``max_new_tokens`` of them)."""
        import torch

        ids = self.tokenizer.encode(messages)
        if self.draft_tokens and sampling.temperature <= 0 and sampling.repetition_penalty == 1.0:
            yield from self._drafted(messages, ids, sampling.max_new_tokens)
            return
        with torch.inference_mode():  # entered per step: a generator's caller must not run inside it
            cache = self.model.new_cache(len(ids) + sampling.max_new_tokens)
            seen = torch.tensor([ids])
            token = _pick(self._prefill(messages, ids, cache), seen, sampling)
        position = len(ids)
        while True:
            yield token
            if position >= len(ids) + sampling.max_new_tokens - 1:
                return
            with torch.inference_mode():
                if sampling.repetition_penalty != 1.0:  # only the penalty reads the tokens seen so far
                    seen = torch.cat([seen, torch.tensor([[token]])], dim=1)
                token = _pick(self.model.forward(torch.tensor([[token]]), position, cache), seen, sampling)
            position += 1

    def _prefill(self, messages: list[dict[str, str]], ids: list[int], cache):
        """The prompt's last logits, its keys and values written into ``cache``. A prompt that opens with a system
        turn is computed in two parts, the system turn and then the rest, always: the system turn's keys and values
        (the same in every request) are computed once and copied after, and an answer does not depend on whether
        they were."""
        import torch

        split = self._system_turn(messages, ids)
        if not split:
            return self.model.forward(torch.tensor([ids]), 0, cache)
        if self._system is None or self._system[0] != ids[:split]:
            computed = self.model.new_cache(split)
            self.model.forward(torch.tensor([ids[:split]]), 0, computed)
            self._system = (ids[:split], [(k[:, :, :split].clone(), v[:, :, :split].clone()) for k, v in computed])
        for (keys, values), (k, v) in zip(cache, self._system[1]):
            keys[:, :, :split], values[:, :, :split] = k, v
        return self.model.forward(torch.tensor([ids[split:]]), split, cache, prompt=True)

    def _system_turn(self, messages: list[dict[str, str]], ids: list[int]) -> int:
        """How many of ``ids`` are the system turn (0: none, or it is not a prefix of the prompt's tokens)."""
        if not messages or messages[0].get("role") != "system" or len(messages) < 2:
            return 0
        head = self.tokenizer.encode(messages[:1], add_generation_prompt=False)
        return len(head) if 0 < len(head) < len(ids) and ids[:len(head)] == head else 0

    def _drafted(self, messages: list[dict[str, str]], ids: list[int], max_new_tokens: int):
        """Greedy tokens, several per forward pass where the looked-up draft is right: the pass takes the last token
        and up to ``draft_tokens`` guessed after it, and each guess is kept while it is the model's own argmax at
        its position; the first that is not is replaced by that argmax. Rejected guesses leave keys and values
        beyond the answer in the cache, overwritten by the next pass."""
        import torch

        answer: list[int] = []
        try:
            with torch.inference_mode():
                cache = self.model.new_cache(len(ids) + max_new_tokens + self.draft_tokens)
                token = int(torch.argmax(self._prefill(messages, ids, cache), dim=-1))
            position = len(ids)  # where ``token`` goes in the cache
            answer.append(token)
            yield token
            while len(answer) < max_new_tokens:
                room = min(self.draft_tokens, max_new_tokens - len(answer) - 1,
                           KEY_BLOCK - 1 - position % KEY_BLOCK)  # a step stays within one block of keys
                draft = self.lookup.draft(ids + answer, room)
                with torch.inference_mode():
                    logits = self.model.forward(torch.tensor([[token, *draft]]), position, cache, every=True)
                picks = torch.argmax(logits, dim=-1).tolist()
                kept = 0
                while kept < len(draft) and picks[kept] == draft[kept]:
                    kept += 1
                for name, count in (("passes", 1), ("drafted", len(draft)), ("kept", kept)):
                    self.drafting[name] += count
                position += kept + 1
                token = picks[kept]
                for new in (*draft[:kept], token):
                    answer.append(new)
                    yield new
        finally:  # also when the caller stops early (a stop token, a time limit)
            self.lookup.remember(answer)


def _pick(logits, seen, sampling: Sampling) -> int:
    import torch

    if sampling.repetition_penalty != 1.0:  # transformers' RepetitionPenaltyLogitsProcessor
        score = torch.gather(logits, 1, seen)
        score = torch.where(score < 0, score * sampling.repetition_penalty, score / sampling.repetition_penalty)
        logits = logits.scatter(1, seen, score)
    if sampling.temperature <= 0:
        return int(torch.argmax(logits, dim=-1))
    logits = logits / sampling.temperature
    if sampling.top_p < 1.0:  # transformers' TopPLogitsWarper: drop the tail holding 1 - top_p of the mass
        ordered, order = torch.sort(logits, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - sampling.top_p)
        drop[..., -1:] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return int(torch.multinomial(logits.softmax(dim=-1), num_samples=1))
