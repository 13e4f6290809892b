"""The learning curve in the metrics that matter: at every evaluation during training, a few validation questions
are answered greedily by the model being trained and scored strictly (number and label correctness, exact
match), next to the validation loss and the training tokens seen so far.

The points are kept beside the checkpoints (``curve.json`` in the job folder), so a resumed run keeps its curve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from finpipe.instructions.samples import Sample

CURVE_FILE = "curve.json"
CURVE_METRICS = ("number_correctness", "label_correctness", "exact_match", "format_validity")


def curve_callback_class():
    from transformers import TrainerCallback

    class StrictLearningCurve(TrainerCallback):
        def __init__(self, tokenizer, samples: Sequence[Sample], max_new_tokens: int, job_dir: Path,
                     tokens_before: int = 0, log=print):
            self.tokenizer, self.samples, self.max_new_tokens = tokenizer, list(samples), max_new_tokens
            self.job_dir, self.tokens_before, self.log = Path(job_dir), tokens_before, log
            try:
                self.points: list[dict] = json.loads((self.job_dir / CURVE_FILE).read_text())
            except (OSError, ValueError):
                self.points = []

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            point = {"step": state.global_step, "tokens": self.tokens_before + int(state.num_input_tokens_seen or 0),
                     "val_loss": round(float((metrics or {}).get("eval_loss", float("nan"))), 4)}
            if self.samples and model is not None:
                point |= self._score(model, args)
            self.points = [p for p in self.points if p["step"] != point["step"]] + [point]
            shown = ", ".join(f"{k} {point[k]:.3f}" for k in CURVE_METRICS if point.get(k) is not None)
            self.log(f"  curve at step {point['step']} ({point['tokens']:,} tokens): val loss {point['val_loss']}"
                     + (f", {shown}" if shown else ""))

        def _score(self, model, args) -> dict:
            import contextlib

            import torch

            from finpipe.evaluation.evaluate import score_answers
            from finpipe.evaluation.generation import Sampling, generate_batch

            training = model.training
            model.eval()
            device = next(model.parameters()).device.type
            autocast = (torch.autocast(device, dtype=torch.bfloat16) if args.bf16 else
                        torch.autocast(device, dtype=torch.float16) if args.fp16 else contextlib.nullcontext())
            with autocast:
                answers = generate_batch(model, self.tokenizer, [s.messages[:-1] for s in self.samples],
                                         Sampling(max_new_tokens=self.max_new_tokens), batch_size=16)
            if training:
                model.train()
            rows = score_answers(self.samples, [a.text for a in answers])
            out = {}
            for name in CURVE_METRICS:
                values = [r[name] for r in rows if r.get(name) is not None]
                out[name] = round(sum(values) / len(values), 4) if values else None
            return out

        def on_save(self, args, state, control, **kwargs):
            if args.process_index == 0:
                self.job_dir.mkdir(parents=True, exist_ok=True)
                tmp = self.job_dir / f".{CURVE_FILE}.tmp"
                tmp.write_text(json.dumps(self.points))
                tmp.replace(self.job_dir / CURVE_FILE)

    return StrictLearningCurve
