"""finpipe's own small GPT: a Llama-architecture model pretrained from scratch on finance text rendered
from the lake (the training split's contexts and answers), with its own byte-level BPE tokenizer.

It is the test suite's fast base model and the lineage's "own GPT": small enough to train in minutes
on 2 CPU cores, real enough to show learning (validation perplexity against the untrained model).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from finpipe import runtime
from finpipe.models.chat_template import CHATML_WITH_GENERATION, IM_END, IM_START
from finpipe.models.files import atomic_dir
from finpipe.settings import non_finite, setting

PAD, EOS = "<|pad|>", "<|endoftext|>"


@dataclass(frozen=True)
class ScratchGPTSpec:
    vocab_size: int = setting(4000, "BPE vocabulary size of the model's own tokenizer")
    hidden_size: int = setting(128, "hidden size")
    intermediate_size: int = setting(352, "MLP size (a multiple of 32: bitsandbytes' CPU 4-bit kernels need it)")
    num_layers: int = setting(4, "decoder layers")
    num_heads: int = setting(4, "attention heads")
    num_kv_heads: int = setting(2, "key/value heads (grouped-query attention)")
    seq_len: int = setting(256, "tokens per training sequence")
    batch_size: int = setting(8, "sequences per optimizer step")
    steps: int = setting(300, "optimizer steps")
    learning_rate: float = setting(3e-3, "peak learning rate")
    warmup_steps: int = setting(20, "linear warmup steps")
    seed: int = setting(0, "initialization and data-order seed")

    def __post_init__(self) -> None:
        if problems := non_finite(self):
            raise ValueError("invalid scratch GPT config: " + "; ".join(problems))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "seq_len",
                     "batch_size", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on ``texts``, as a standard HF fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    # split digits individually, as Llama-family tokenizers do: numbers are copied digit by digit
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=IM_END, bos_token=IM_START,
                                  unk_token=EOS)
    tok.chat_template = CHATML_WITH_GENERATION
    return tok


def _blocks(tokenizer, texts: list[str], seq_len: int):
    import torch

    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.convert_tokens_to_ids(EOS))
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"corpus too small: {len(ids)} tokens < one block of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def perplexity(model, blocks, batch_size: int) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            batch = blocks[i : i + batch_size]
            loss = model(input_ids=batch, labels=batch).loss
            total += loss.item() * batch.numel()
            count += batch.numel()
    model.train()
    return math.exp(total / count)


@dataclass
class PretrainReport:
    parameters: int
    train_tokens: int
    val_tokens: int
    steps: int
    initial_val_perplexity: float
    final_val_perplexity: float
    losses: list[float]
    tokens_per_s: float
    seconds: float
    dtype: str
    config: dict


def pretrain(train_texts: list[str], val_texts: list[str], target: Path, config: ScratchGPTSpec = ScratchGPTSpec(),
             log=print) -> PretrainReport:
    """Train tokenizer + model, measure validation perplexity before/after, save atomically to ``target``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

    torch.manual_seed(config.seed)
    tokenizer = train_tokenizer(train_texts, config.vocab_size)
    train_blocks = _blocks(tokenizer, train_texts, config.seq_len)
    val_blocks = _blocks(tokenizer, val_texts, config.seq_len)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=max(config.seq_len, 1024),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(model_config)
    initial = perplexity(model, val_blocks, config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    # bf16 autocast where it pays (as for adapters: runtime decides); fp32 master weights either way
    device_type = runtime.accelerator()
    use_bf16 = device_type == "cuda" or runtime.cpu_bf16_pays()
    model.to(device_type)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    for step in range(config.steps):
        idx = torch.randint(0, len(train_blocks), (config.batch_size,), generator=generator)
        batch = train_blocks[idx].to(device_type)
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if step % 50 == 0 or step == config.steps - 1:
            log(f"scratch GPT step {step + 1}/{config.steps}: loss {loss.item():.3f}")
    seconds = time.perf_counter() - started
    model.to("cpu")
    final = perplexity(model, val_blocks, config.batch_size)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return PretrainReport(
        parameters=sum(p.numel() for p in model.parameters()), train_tokens=train_blocks.numel(),
        val_tokens=val_blocks.numel(), steps=config.steps, initial_val_perplexity=round(initial, 2),
        final_val_perplexity=round(final, 2), losses=losses,
        tokens_per_s=round(config.steps * config.batch_size * config.seq_len / seconds, 1), seconds=round(seconds, 1),
        dtype="bf16 autocast" if use_bf16 else "fp32", config=asdict(config),
    )

