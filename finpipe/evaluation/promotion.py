"""When a freshly trained adapter (the challenger) replaces the champion. Pure functions over metric dicts
(``ModelScores.as_dict()`` or the registry's stored metrics), so the rule is testable on hand-made numbers
and the asset checks and the promotion asset apply exactly the same rule.

A challenger is promoted only if all hold:
1. it beats the base model on validation loss (an adapter that does not is broken, whatever else it does);
2. no golden-set answer metric (numeric fidelity, label accuracy) drops more than ``tolerance`` below the
   champion's;
3. it improves on the champion on the golden set: lower golden loss when both share a base (same tokenizer,
   comparable losses), else a higher mean of numeric fidelity, label accuracy and ROUGE-L.
With no champion yet, rule 1 alone decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finpipe.evaluation.evaluate import quality_score

GUARDED_METRICS = ("numeric_fidelity", "label_accuracy")


@dataclass
class Decision:
    promote: bool
    reason: str
    beats_base: bool
    regressions: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> {champion, challenger}


def beats_base(challenger: dict, base: dict) -> bool:
    return challenger["val"]["loss"] < base["val"]["loss"]


def quality(scores: dict) -> float:
    return quality_score(scores["golden"]["overall"])


def golden_regressions(challenger: dict, champion: dict, tolerance: float) -> dict[str, dict[str, float]]:
    out = {}
    for metric in GUARDED_METRICS:
        new, old = challenger["golden"]["overall"].get(metric), champion["golden"]["overall"].get(metric)
        if new is not None and old is not None and new < old - tolerance:
            out[metric] = {"champion": old, "challenger": new}
    return out


def decide(challenger: dict, base: dict, champion: dict | None, tolerance: float, same_base: bool = True) -> Decision:
    if not beats_base(challenger, base):
        return Decision(False, f"validation loss {challenger['val']['loss']:.4f} does not beat the base model's "
                               f"{base['val']['loss']:.4f}", beats_base=False)
    if champion is None:
        return Decision(True, "first champion: beats the base model on validation loss "
                              f"({challenger['val']['loss']:.4f} < {base['val']['loss']:.4f})", beats_base=True)
    regressions = golden_regressions(challenger, champion, tolerance)
    if regressions:
        worst = ", ".join(f"{k} {v['challenger']:.3f} < champion {v['champion']:.3f} - {tolerance}"
                          for k, v in regressions.items())
        return Decision(False, f"regresses on the golden set: {worst}", beats_base=True, regressions=regressions)
    if same_base:
        new, old = challenger["golden"]["loss"], champion["golden"]["loss"]
        if new < old:
            return Decision(True, f"golden loss {new:.4f} < champion {old:.4f}, no regression", beats_base=True)
        return Decision(False, f"golden loss {new:.4f} does not improve on the champion's {old:.4f}", beats_base=True)
    new, old = quality(challenger), quality(champion)
    if new > old:
        return Decision(True, f"golden quality {new:.3f} > champion {old:.3f} (different bases), no regression",
                        beats_base=True)
    return Decision(False, f"golden quality {new:.3f} does not improve on the champion's {old:.3f} (different bases)",
                    beats_base=True)
