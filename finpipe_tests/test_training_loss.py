"""The training loss projects only the answer positions through the vocabulary, a chunk at a time, in training and in
evaluation, for every PEFT method; the chunked loss is the plain cross-entropy; finpipe's grouped attention is the
model's eager attention."""

from dataclasses import replace

import pytest
import torch

from finpipe.training.spec import METHODS, AdapterSpec
from finpipe_tests.helpers import tiny_split


def spec(**changes) -> AdapterSpec:
    base = dict(quantization="none", lora_r=4, lora_alpha=8, learning_rate=5e-3, max_minutes=0, max_steps=2,
                batch_size=3, max_seq_len=512, eval_points=1, early_stopping_patience=0, max_train_samples=12,
                max_val_samples=4, curve_answers_per_family=0, general_replay_share=0.0, logging_steps=1,
                adalora_init_r=6, adalora_target_r=2, vblora_num_vectors=16, vblora_vector_length=16,
                lora_layer_share=1.0)
    return AdapterSpec(**(base | changes))


def answer_tokens(inputs) -> int:
    return int((inputs["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize("method", METHODS)
def test_the_loss_projects_only_answer_positions_in_training_and_evaluation(method, tiny_base, tmp_path):
    """Every row the LM head projects is an answer position, a chunk at most at a time, in ``train()`` and in
    ``evaluate()`` (prediction_loss_only), through the method's own trainer class; the model's full forward (TRL's
    loss, entropy and accuracy logs, logits for metrics) never runs."""
    from finpipe.models.safe_loading import load_tokenizer
    from finpipe.training import peft_methods, sft
    from finpipe.training.device import plan_device

    s = spec(method=method)
    tokenizer = load_tokenizer(tiny_base)
    data = sft.prepare_data(s, tokenizer, tiny_split().train, tiny_split().val, "cpu")
    plan = plan_device(s.quantization, "off", prefer_cpu=True)
    model, peft_config, used = sft.attach_adapter(sft.load_base(tiny_base, plan.quantization, plan), s, plan, None,
                                                  print)
    run = sft.build_trainer(s, plan, data, model, peft_config, used, peft_methods.prepare_training(used), tokenizer,
                            tmp_path / "job", 0, [], lambda _: None)
    trainer = run.trainer
    causal = trainer.model.get_base_model()
    rows: dict[str, list[int]] = {"train": [], "eval": []}
    answers: dict[str, list[int]] = {"train": [], "eval": []}

    def projected(module, args, output):
        assert args[0].dim() == 2 and output.shape == (args[0].shape[0], causal.config.vocab_size)
        assert args[0].shape[0] <= sft.LOSS_CHUNK_POSITIONS
        rows["train" if module.training else "eval"].append(args[0].shape[0])

    def full_forward(*_):
        raise AssertionError("the model's full forward ran: logits for every position")

    compute_loss = trainer.compute_loss

    def counted(model, inputs, **kwargs):
        answers["train" if model.training else "eval"].append(answer_tokens(inputs))
        return compute_loss(model, inputs, **kwargs)

    trainer.compute_loss = counted
    hooks = [causal.get_output_embeddings().register_forward_hook(projected),
             causal.register_forward_pre_hook(full_forward)]
    try:
        trainer.evaluate()
        trainer.train()
    finally:
        for hook in hooks:
            hook.remove()
    assert sum(answers["train"]) > 0 and sum(answers["eval"]) > 0
    assert sum(rows["train"]) == sum(answers["train"]) and sum(rows["eval"]) == sum(answers["eval"]), (rows, answers)
    assert trainer.state.global_step == 2 and all(torch.isfinite(torch.tensor(
        [h["loss"] for h in trainer.state.log_history if "loss" in h])))


@pytest.mark.parametrize("bias", [False, True])
def test_the_chunked_head_loss_is_the_cross_entropy_and_keeps_no_logits(bias):
    from finpipe.training.sft import head_cross_entropy

    torch.manual_seed(0)
    vocab, width, n = 97, 16, 23
    head = torch.nn.Linear(width, vocab, bias=bias)
    hidden = torch.randn(n, width, requires_grad=True)
    target = torch.randint(0, vocab, (n,))
    expected = torch.nn.functional.cross_entropy(head(hidden), target, reduction="sum")
    want = torch.autograd.grad(expected, [hidden, *head.parameters()])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        ours = head_cross_entropy(head, hidden, target, chunk=5)
    assert not any(vocab in shape for shape in saved), saved  # no logits kept for the backward pass
    got = torch.autograd.grad(ours, [hidden, *head.parameters()])
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert head_cross_entropy(head, hidden, target, chunk=5).item() == pytest.approx(expected.item(), rel=1e-6)
    # a frozen bf16 head under autocast, as on a bf16 CPU: the same loss and gradient as the full projection
    head = head.to(torch.bfloat16).requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = torch.nn.functional.cross_entropy(head(hidden).float(), target, reduction="sum")
        ours = head_cross_entropy(head, hidden, target, chunk=5)
    (g_ref,), (g_ours,) = torch.autograd.grad(reference, [hidden]), torch.autograd.grad(ours, [hidden])
    assert ours.item() == pytest.approx(reference.item(), rel=1e-4)
    torch.testing.assert_close(g_ours, g_ref, rtol=2e-2, atol=2e-3)


def test_the_answer_loss_and_adapter_gradients_do_not_depend_on_the_chunk(tiny_base):
    from peft import get_peft_model

    from finpipe.training import peft_methods
    from finpipe.training.device import plan_device
    from finpipe.training.sft import answer_loss, load_base

    torch.manual_seed(0)
    plan = replace(plan_device("none", "off", prefer_cpu=True), compute_dtype="float32", bf16=False, attention="eager")
    base = load_base(tiny_base, "none", plan)
    model = get_peft_model(base, peft_methods.build_peft_config(spec(), base))
    for name, p in model.named_parameters():  # LoRA B starts at zero: give the adapter a gradient to compare
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(3, 500, (2, 40))
    labels = ids.clone()
    labels[0, :25], labels[1, :12] = -100, -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    trainable = [p for p in model.parameters() if p.requires_grad]
    results = []
    for chunk in (7, 10**6):
        loss = answer_loss(model, inputs, chunk=chunk)
        results.append((loss.detach(), torch.autograd.grad(loss, trainable)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_grouped_attention_is_the_eager_attention(tiny_base, monkeypatch):
    """finpipe's attention for bf16 CPU training: the same logits, gradients and greedy generation as eager (fp32,
    grouped-query heads, right padding)."""
    from transformers import AutoModelForCausalLM

    from finpipe.training import attention
    from finpipe.training.device import plan_device

    models = {name: AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation=name)
              for name in ("eager", attention.register())}
    assert models["eager"].config.num_key_value_heads < models["eager"].config.num_attention_heads
    ids = torch.randint(3, 500, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, 21:] = 0
    out = {}
    for name, model in models.items():
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = logits[mask.bool()].logsumexp(-1).sum()
        out[name] = (logits.detach(), torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(out["eager"][0][mask.bool()], out[attention.NAME][0][mask.bool()], rtol=1e-5, atol=1e-5)
    for a, b in zip(out["eager"][1], out[attention.NAME][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    generated = [m.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=6, do_sample=False)
                 for m in models.values()]
    assert torch.equal(*generated)

    class Llama:
        model_type, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads = "llama", 64, 128, 2, 4

    class Other(Llama):
        model_type = "gemma2"  # its own eager attention (soft-capping): left to transformers

    from finpipe import runtime

    monkeypatch.setattr(runtime, "cpu_bf16_pays", lambda: True)
    assert plan_device("none", "off", Llama(), prefer_cpu=True).attention == attention.NAME
    assert plan_device("none", "off", Other(), prefer_cpu=True).attention == "eager"
    monkeypatch.setattr(runtime, "cpu_bf16_pays", lambda: False)
    assert plan_device("none", "off", Llama(), prefer_cpu=True).attention == "sdpa"
