"""A training budget in time (and/or steps, epochs): when to evaluate, when to stop, and the learning rate.

*Progress* is the largest of: wall time spent in training / ``max_minutes``, optimizer steps / ``max_steps``,
epochs / ``max_epochs`` (each only when set). Training stops at progress 1, so a faster machine trains more
steps in the same minutes. The learning rate follows progress, not steps: linear warmup over the first
``warmup_ratio``, then (``lr_schedule``) a cosine or linear decay that reaches 0 at progress 1, or a constant
rate — whatever the machine, the schedule ends when the budget does. Evaluations (validation loss, the strict-metric
learning curve, a checkpoint)
happen at ``eval_points`` evenly spaced progress marks, the last one at the end.

The clock counts the wall time of the training steps only: the evaluations at the marks (validation loss,
the learning curve's greedy answers, checkpoints) are not charged to it, so a budget buys the same training on
every run whatever ``eval_points`` is (measured on a 2-core CPU: two mid-run evaluations had taken 60 s of a
150 s budget, 40% of the training). The clock survives an interruption: it is saved beside each checkpoint
(``clock.json`` in the job folder), so a resumed run continues its budget instead of starting a new one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_FILE = "clock.json"


def lr_factor(progress: float, warmup_ratio: float, schedule: str = "cosine") -> float:
    """The learning rate as a fraction of the peak at ``progress`` in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup_ratio > 0 and progress < warmup_ratio:
        return max(progress / warmup_ratio, 0.02)  # never exactly 0: the first step still learns
    decay = min((progress - warmup_ratio) / max(1e-9, 1 - warmup_ratio), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - decay
    return 0.5 * (1 + math.cos(math.pi * decay))


@dataclass(frozen=True)
class ScheduleReplay:
    """What a time-budgeted run's clock decided, recorded in its training report, so the run can be retrained the
    same way on a steps budget: its step count, the learning-rate factor of each scheduler step, and the steps at
    which it evaluated (and checkpointed: the best evaluation's weights are the adapter)."""

    steps: int
    lr_factors: tuple[float, ...]
    eval_steps: frozenset[int]

    @classmethod
    def of(cls, training_report: dict) -> "ScheduleReplay | None":
        factors, steps = training_report.get("lr_factors"), training_report.get("steps")
        if not factors or not steps:
            return None
        evals = frozenset(int(step) for step, _ in training_report.get("eval_losses") or [] if int(step) > 0)
        return cls(int(steps), tuple(float(f) for f in factors), evals)


def budget_callback_class():
    from transformers import TrainerCallback

    from finpipe.training.launch import distributed, max_across_ranks

    class TrainingBudget(TrainerCallback):
        """Stops training when the budget is spent, asks for evaluations (and checkpoints) at the progress marks,
        and exposes ``lr_factor()`` to the scheduler."""

        def __init__(self, max_minutes: float, max_steps: int, max_epochs: float, eval_points: int,
                     warmup_ratio: float, job_dir: Path, schedule: str = "cosine", log=None,
                     replay: ScheduleReplay | None = None):
            self.budget_s = max_minutes * 60
            self.max_steps, self.max_epochs = max_steps, max_epochs
            self.replay = replay
            if replay is not None:  # a recorded run's steps, learning rates and evaluations; the clock plays no part
                self.budget_s, self.max_steps, self.max_epochs = 0.0, replay.steps, 0.0
            self.lr_given: list[float] = []  # every factor handed to the scheduler, in order: what a replay needs
            self.eval_points, self.warmup_ratio, self.schedule = eval_points, warmup_ratio, schedule
            self.job_dir = Path(job_dir)
            self.elapsed_before = self._saved_elapsed()
            self.started: float | None = None  # when the running step began (None between steps)
            self.trained_s = 0.0  # this run's time inside training steps
            self.step, self.epoch = 0, 0.0
            self.marks_done = 0
            self.stopped_by: str | None = None
            self.log, self.reported = log, 0  # progress lines at every tenth of the budget

        def _saved_elapsed(self) -> float:
            try:
                return float(json.loads((self.job_dir / CLOCK_FILE).read_text())["elapsed_s"])
            except (OSError, ValueError, KeyError):
                return 0.0

        def elapsed(self) -> float:
            running = time.perf_counter() - self.started if self.started is not None and not distributed() else 0.0
            return self.elapsed_before + self.trained_s + running

        def progress(self) -> float:
            parts = [0.0]
            if self.budget_s > 0:
                parts.append(self.elapsed() / self.budget_s)
            if self.max_steps > 0:
                parts.append(self.step / self.max_steps)
            if self.max_epochs > 0:
                parts.append(self.epoch / self.max_epochs)
            return max(parts)

        def lr_factor(self) -> float:
            if self.replay is not None and self.replay.lr_factors:
                given = self.replay.lr_factors
                value = given[min(len(self.lr_given), len(given) - 1)]
            else:
                value = lr_factor(self.progress(), self.warmup_ratio, self.schedule)
            self.lr_given.append(value)
            return value

        def on_train_begin(self, args, state, control, **kwargs):
            self.step, self.epoch = state.global_step, state.epoch or 0.0
            self.marks_done = int(self.progress() * self.eval_points + 1e-9)

        def on_step_begin(self, args, state, control, **kwargs):
            from finpipe.runtime import rebalance

            rebalance()  # another finpipe process started or ended: take the new share of the cores
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.started is not None:
                self.trained_s += time.perf_counter() - self.started
                self.started = None
            if distributed():  # every rank on the slowest rank's clock: the same schedule, marks and stop
                self.trained_s = max_across_ranks(self.trained_s)
            self.step, self.epoch = state.global_step, state.epoch or 0.0
            progress = self.progress()
            tenth = min(10, int(progress * 10 + 1e-9))
            if self.log is not None and tenth > self.reported:
                self.reported = tenth
                left = (f", about {max(0.0, self.budget_s - self.elapsed()) / 60:.1f} min left"
                        if self.budget_s > 0 else "")
                self.log(f"training: {min(progress, 1.0):.0%} of the budget (step {state.global_step}, "
                         f"{int(state.num_input_tokens_seen or 0):,} tokens{left})")
            mark = min(self.eval_points, int(progress * self.eval_points + 1e-9))
            if self.replay is not None:  # evaluations where the recorded run had them: the best one is kept
                mark = self.marks_done + (state.global_step in self.replay.eval_steps)
            if mark > self.marks_done:
                self.marks_done = mark
                control.should_evaluate = control.should_save = True
            if progress >= 1.0:
                self.stopped_by = self._limit()
                control.should_training_stop = True
                control.should_evaluate = control.should_save = True
            return control

        def _limit(self) -> str:
            spent = {"time": self.elapsed() / self.budget_s if self.budget_s > 0 else 0,
                     "steps": self.step / self.max_steps if self.max_steps > 0 else 0,
                     "epochs": self.epoch / self.max_epochs if self.max_epochs > 0 else 0}
            return max(spent, key=spent.get)

        def on_save(self, args, state, control, **kwargs):
            if args.process_index == 0:
                self.job_dir.mkdir(parents=True, exist_ok=True)
                tmp = self.job_dir / f".{CLOCK_FILE}.tmp"
                tmp.write_text(json.dumps({"elapsed_s": round(self.elapsed(), 3), "step": state.global_step}))
                tmp.replace(self.job_dir / CLOCK_FILE)

    return TrainingBudget


def budgeted_trainer_class(base):
    """``base`` (an SFTTrainer class) whose learning-rate schedule follows the budget's progress."""
    from torch.optim.lr_scheduler import LambdaLR

    class BudgetedTrainer(base):
        budget = None  # a TrainingBudget callback, set before train()

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                budget = self.budget
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lambda _step: budget.lr_factor())
            return self.lr_scheduler

    BudgetedTrainer.__name__ = f"Budgeted{base.__name__}"
    return BudgetedTrainer
