"""One place that turns an ``AdapterSpec`` into a peft config, plus what each PEFT method needs during training.

Methods (``AdapterSpec.method``), all through peft, all orthogonal to ``quantization`` (QLoRA = lora + nf4):
    lora     ``LoraConfig``                      exactly what finpipe trained before methods existed
    dora     ``LoraConfig(use_dora=True)``       LoRA + a trainable magnitude vector per module (same r)
    adalora  ``AdaLoraConfig``                   SVD-style LoRA whose total rank shrinks from init_r to target_r
    vblora   ``VBLoRAConfig``                    every sub-vector is a top-k mix of one shared vector bank
    ia3      ``IA3Config``                       one learned scaling vector per module (no rank)

What the methods need beyond a config, all wired by ``finpipe.training.sft.train_adapter``:
    adalora  ``model.base_model.update_and_allocate(step)`` after ``optimizer.step()`` and before ``zero_grad()``:
             ``AdaLoraRankAllocation``, a TrainerCallback on ``on_optimizer_step`` (transformers 5.x calls it right
             after ``optimizer.step()``, before ``lr_scheduler.step()`` and ``model.zero_grad()``, with
             ``state.global_step`` still the 0-based index of the step, as in peft's examples).
             Its orthogonal regularisation: peft adds it to ``outputs.loss``, but TRL's SFTTrainer computes the loss
             from the fused per-token log-probs and never reads ``outputs.loss``: ``trainer_class`` adds it back in
             ``compute_loss`` (training only; evaluation losses stay pure NLL, comparable across methods).
    vblora   checkpoints keep the full logits (resume, best-checkpoint reload); only the final adapter is saved with
             ``save_only_topk_weights`` (``prepare_final_save``).
    ia3      under QLoRA, TRL casts the trainable adapter weights to bf16; IA3 vectors sit at ~1.0, where bf16 cannot
             represent updates below ~4e-3, so they would stay frozen: ``restore_fp32`` keeps them fp32 (TRL already
             does the same for DoRA's magnitude vector).

Heavy imports (peft, transformers, torch) stay inside functions: the Dagster code location imports finpipe cheaply.
"""

from __future__ import annotations

import math
from functools import lru_cache

from finpipe.training.spec import AdapterSpec

# Feed-forward (MLP) projections: IA3 scales their *input* (the paper's l_ff), the other modules' output.
FEEDFORWARD_LEAF_NAMES = frozenset({"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "w1", "w2", "w3", "c_fc",
                                    "c_proj_mlp", "dense_h_to_4h", "dense_4h_to_h", "wi", "wo"})
FEEDFORWARD_PARENTS = frozenset({"mlp", "feed_forward", "ffn", "ff"})
ADAPTER = "default"


def targeted_linears(spec: AdapterSpec, model) -> dict:
    """The modules peft will adapt, by full name: every linear layer but the output head for 'all-linear', else the
    modules whose name is, or ends with '.' + , one of the listed names (peft's matching rule for a list)."""
    import torch

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not output and name}  # bnb's Linear4bit is a Linear
    wanted = spec.target_modules_value
    if wanted == "all-linear":
        found = linears
    else:
        found = {name: m for name, m in linears.items() if any(name == w or name.endswith("." + w) for w in wanted)}
        missing = [w for w in wanted if not any(name == w or name.endswith("." + w) for name in found)]
        if missing:
            leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ValueError(f"target_modules {missing} match no linear layer of the model; its linear layers are "
                             f"named {leaves}")
    if not found:
        raise ValueError(f"target_modules {spec.target_modules!r} match no linear layer of the model")
    return found


def feedforward_modules(targets: dict) -> list[str]:
    """The targeted modules that belong to the MLP block (Llama: gate_proj, up_proj, down_proj), by full name."""
    return sorted(name for name in targets
                  if name.split(".")[-1] in FEEDFORWARD_LEAF_NAMES
                  or FEEDFORWARD_PARENTS.intersection(name.split(".")[:-1]))


def check_vblora_vector_length(spec: AdapterSpec, targets: dict) -> None:
    """VB-LoRA cuts every A row and B column into sub-vectors of vector_length: it must divide all in/out features."""
    length = spec.vblora_vector_length
    bad = {name: (m.in_features, m.out_features) for name, m in targets.items()
           if m.in_features % length or m.out_features % length}
    if bad:
        name, (fan_in, fan_out) = next(iter(bad.items()))
        common = math.gcd(*(n for m in targets.values() for n in (m.in_features, m.out_features)))
        fitting = [d for d in range(common, 0, -1) if common % d == 0][:6]
        raise ValueError(
            f"vblora_vector_length {length} must divide the in and out features of every targeted module, but "
            f"{len(bad)} of {len(targets)} do not (e.g. {name}: in_features {fan_in}, out_features {fan_out}); "
            f"lengths that fit every targeted module: {fitting}"
        )


def build_peft_config(spec: AdapterSpec, model):
    """The peft config for ``spec.method`` on ``model`` (the base model, possibly 4-bit, not yet wrapped)."""
    from peft import AdaLoraConfig, IA3Config, LoraConfig, VBLoRAConfig

    targets = targeted_linears(spec, model)  # fails early, with the model's module names, on a wrong list
    target_modules = spec.target_modules_value
    if spec.method in ("lora", "dora"):
        extra: dict = {"use_dora": True} if spec.method == "dora" else {}
        if spec.lora_layer_share < 1:
            layers = model.config.num_hidden_layers
            adapted = max(1, round(layers * spec.lora_layer_share))
            # peft restricts layers only for a list of module names: 'all-linear' becomes its leaf names
            target_modules = sorted({name.rsplit(".", 1)[-1] for name in targets})
            extra |= {"layers_to_transform": list(range(layers - adapted, layers)), "layers_pattern": "layers"}
        return LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                          target_modules=target_modules, task_type="CAUSAL_LM", bias="none", **extra)
    if spec.method == "adalora":
        tinit, tfinal, delta_t = spec.adalora_schedule()
        # `r` is not passed: AdaLoRA ignores it (and warns when it differs from 8); init_r is its starting rank
        return AdaLoraConfig(init_r=spec.adalora_init_r, target_r=spec.adalora_target_r, lora_alpha=spec.lora_alpha,
                             lora_dropout=spec.lora_dropout, target_modules=target_modules, task_type="CAUSAL_LM",
                             bias="none", tinit=tinit, tfinal=tfinal, deltaT=delta_t, total_step=spec.max_steps)
    if spec.method == "vblora":
        check_vblora_vector_length(spec, targets)
        return VBLoRAConfig(r=spec.lora_r, num_vectors=spec.vblora_num_vectors,
                            vector_length=spec.vblora_vector_length, topk=spec.vblora_topk,
                            vblora_dropout=spec.lora_dropout, target_modules=target_modules, task_type="CAUSAL_LM",
                            bias="none", save_only_topk_weights=False)  # switched on for the final save only
    if spec.method == "ia3":
        # Full module names for both lists: peft saves 'all-linear' expanded to full names, and on reload checks
        # that feedforward_modules is a subset of target_modules (leaf names like 'down_proj' would fail it).
        return IA3Config(target_modules=sorted(targets), feedforward_modules=feedforward_modules(targets),
                         task_type="CAUSAL_LM")
    raise ValueError(f"method must be one of lora, adalora, vblora, dora, ia3, got {spec.method!r}")


def method_of(peft_config) -> str:
    """The finpipe method name of a peft config (e.g. a warm-start adapter's)."""
    kind = str(getattr(peft_config.peft_type, "value", peft_config.peft_type)).upper()
    if kind == "LORA":
        return "dora" if getattr(peft_config, "use_dora", False) else "lora"
    return {"ADALORA": "adalora", "VBLORA": "vblora", "IA3": "ia3"}.get(kind, kind.lower())


def _adalora_tuner(model):
    """The ``AdaLoraModel`` inside a ``PeftModel`` (or the tuner itself)."""
    tuner = getattr(model, "base_model", model)
    if not hasattr(tuner, "update_and_allocate"):
        raise TypeError(f"not an AdaLoRA model: {type(model).__name__}")
    return tuner


def adalora_rank_pattern(model) -> dict[str, list[bool]]:
    """Which singular triplets are alive (E != 0), per AdaLoRA module, keyed like peft's own rank_pattern."""
    tuner = _adalora_tuner(model)
    name = tuner.trainable_adapter_name if hasattr(tuner, "trainable_adapter_name") else ADAPTER
    return {n: (p.detach().view(-1) != 0).tolist() for n, p in tuner.model.named_parameters()
            if f"lora_E.{name}" in n}


def adalora_total_rank(model) -> tuple[int, int]:
    """(ranks alive now, initial budget) summed over every AdaLoRA module."""
    pattern = adalora_rank_pattern(model)
    return sum(sum(v) for v in pattern.values()), sum(len(v) for v in pattern.values())


def orthogonal_regularization(model):
    """AdaLoRA's penalty, as peft's ``AdaLoraModel.forward`` computes it: orth_reg_weight times the mean over the
    adapter's P (lora_A) and Q (lora_B) matrices of ||P P^T - I||_F (||Q^T Q - I||_F)."""
    import torch

    tuner = _adalora_tuner(model)
    name = tuner.trainable_adapter_name
    weight = tuner.peft_config[name].orth_reg_weight
    terms = []
    for n, p in tuner.model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and name in n and p.numel():
            cov = p @ p.T if "lora_A" in n else p.T @ p
            terms.append(torch.norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device), p="fro"))
    if not terms or weight == 0:
        return None
    return weight * torch.stack(terms).mean()


@lru_cache(maxsize=None)
def _callback_class():
    from transformers import TrainerCallback

    class AdaLoraRankAllocation(TrainerCallback):
        """Calls ``update_and_allocate(global_step)`` after every optimizer step, before gradients are zeroed.

        peft keeps the allocation in ``peft_config.rank_pattern``, and any ``save_pretrained`` with a rank_pattern
        set drops the pruned triplets: Trainer checkpoints would then no longer fit the full-size training model (or
        its optimizer state) on resume. The pattern is therefore held here between steps and the config keeps None,
        so checkpoints stay full size (pruned E entries are zero); ``prepare_final_save`` shrinks the final adapter.
        """

        def __init__(self, allocate: bool = True):
            self.allocate = allocate  # False: a warm-started adapter, already shrunk, keeps its ranks
            self.rank_pattern: dict | None = None
            self.ranks: list[tuple[int, int]] = []  # (step, total rank alive) after each reallocation

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if not self.allocate:
                return
            # Resumed inside the final phase (the checkpoint is loaded and global_step restored by now): the live
            # triplets are the checkpoint's non-zero E. Read them before the first step: the restored Adam moments
            # move pruned E entries off zero at once.
            tuner = _adalora_tuner(model)
            config = tuner.peft_config[tuner.trainable_adapter_name]
            if self.rank_pattern is None and state.global_step > config.total_step - config.tfinal:
                self.rank_pattern = adalora_rank_pattern(model)

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not self.allocate:
                return
            tuner = _adalora_tuner(model)
            config = tuner.peft_config[tuner.trainable_adapter_name]
            step = state.global_step  # not yet incremented: the 0-based index of the step just taken
            config.rank_pattern = self.rank_pattern
            tuner.update_and_allocate(step)
            if config.rank_pattern is not self.rank_pattern:  # a new allocation
                self.ranks.append((step + 1, sum(sum(v) for v in config.rank_pattern.values())))
            self.rank_pattern, config.rank_pattern = config.rank_pattern, None

    return AdaLoraRankAllocation


def prepare_training(method: str, warm_started=None, log=print) -> list:
    """The callbacks the method needs, and the fix-ups a warm-started adapter needs; call before the trainer exists.
    ``warm_started``: the PeftModel loaded from an earlier adapter, if any.

    A warm-started AdaLoRA adapter keeps the ranks it was saved with: its modules are already shrunk, and peft would
    shrink them again (IndexError) whenever a checkpoint is loaded (resume, best checkpoint) while its config holds
    the rank_pattern; the pattern is held aside until the final save.
    A warm-started VB-LoRA adapter saved with top-k weights only has -inf logits outside its top-k, and peft refuses
    to train on them ("Found infinity values in VB-LoRA logits"): they become a large finite negative (the same
    function; training keeps each sub-vector's top-k choice and refines its weights and the bank), and checkpoints
    keep full logits again so that a resume loads finite values."""
    if method == "vblora" and warm_started is not None:
        import torch

        filled = 0
        for name, param in warm_started.named_parameters():
            if "vblora_logits" in name and torch.isinf(param).any():
                filled += int(torch.isinf(param).sum())
                param.data = torch.nan_to_num(param.data, neginf=-1e4)
        warm_started.peft_config[ADAPTER].save_only_topk_weights = False
        if filled:
            log(f"warm start: {filled} VB-LoRA logits outside the saved top-k set to -1e4 (top-k choices stay fixed)")
    if method != "adalora":
        return []
    callback = _callback_class()(allocate=warm_started is None)
    if warm_started is not None:
        config = warm_started.peft_config[ADAPTER]
        callback.rank_pattern, config.rank_pattern = config.rank_pattern, None
    return [callback]


def trainer_class(method: str, base):
    """``base`` (SFTTrainer), or for AdaLoRA a subclass whose training loss includes the orthogonal regularisation."""
    if method != "adalora":
        return base

    class AdaLoraSFTTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            if not model.training:
                return result
            penalty = orthogonal_regularization(model)
            if penalty is None:
                return result
            # like TRL's MoE aux loss: with num_items_in_batch the Trainer leaves accumulation to the loss
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            if return_outputs:
                loss, outputs = result
                return loss + penalty / steps, outputs
            return result + penalty / steps

    return AdaLoraSFTTrainer


def keep_input_dtype(model) -> int:
    """For training under mixed-precision autocast: the adapter layers take their (bf16) input as it is. peft otherwise
    casts it to the adapter's fp32 weights and autocast casts it straight back for the matmul, two copies of every
    adapted layer's input forward and two backward (measured 2-4% of a CPU step, 28 MB of the activations kept for
    the backward pass); the matmuls run in bf16 either way. Returns how many layers changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def restore_fp32(model, spec: AdapterSpec) -> int:
    """Keep IA3 scaling vectors in fp32 after TRL's QLoRA bf16 cast; returns how many were cast back."""
    import torch

    if spec.method != "ia3":
        return 0
    changed = 0
    for name, param in model.named_parameters():
        if param.requires_grad and "ia3_l" in name and param.dtype != torch.float32:
            param.data = param.data.float()
            changed += 1
    return changed


def prepare_final_save(model, method: str, callbacks=()) -> dict:
    """Make the final ``save_pretrained`` small: VB-LoRA top-k weights only; AdaLoRA without its pruned triplets.
    Returns facts for the report."""
    config = model.peft_config[ADAPTER]
    if method == "vblora":
        config.save_only_topk_weights = True
        return {}
    allocation = next((cb for cb in callbacks if isinstance(cb, _callback_class())), None)
    if method != "adalora" or allocation is None:
        return {}
    if not allocation.allocate:  # warm start: the modules are already shrunk; its pattern (against init_r) stays
        config.rank_pattern = allocation.rank_pattern
        pattern = config.rank_pattern or {}
        return {"adalora_total_rank": sum(sum(v) for v in pattern.values()),
                "adalora_initial_rank": sum(len(v) for v in pattern.values())}
    # the adapter as it is now (possibly the best checkpoint, reloaded): exactly its live triplets (E != 0)
    alive, initial = adalora_total_rank(model)
    config.rank_pattern = adalora_rank_pattern(model)
    return {"adalora_total_rank": alive, "adalora_initial_rank": initial, "adalora_rank_history": allocation.ranks}
