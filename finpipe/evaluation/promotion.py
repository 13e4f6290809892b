"""When a freshly trained adapter (the challenger) replaces the champion. Pure functions over metric dicts
(``ModelScores.as_dict()`` or the registry's stored metrics), so the rule is testable on hand-made numbers
and the asset checks and the promotion asset apply exactly the same rule.

A challenger is promoted only if all hold:
1. it beats the base model on validation loss (an adapter that does not is broken, whatever else it does);
2. it has not clearly forgotten general skills: on the forgetting probe it is not more than
   ``forgetting_tolerance`` below the base **and** significantly below it (the paired 95% bootstrap interval
   of challenger - base lies below zero);
3. no strict golden metric (number correctness, label correctness, exact match) drops more than ``tolerance``
   below the champion's, and, where both were asked the wild questions end to end (what users type, through
   the answering path: ``finpipe.evaluation.end_to_end``), neither does their number or label correctness or
   relevance there;
4. it improves on the champion on the golden set's strict quality (the mean of the strict metrics); at equal
   quality, a lower golden loss decides when both share a base (same tokenizer, comparable losses).
With no champion yet, rules 1 and 2 decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finpipe.evaluation.evaluate import STRICT_METRICS, quality_score
from finpipe.evaluation.stats import paired_difference_ci

GUARDED_METRICS = STRICT_METRICS


@dataclass
class Decision:
    promote: bool
    reason: str
    beats_base: bool
    regressions: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> {champion, challenger}
    forgetting: dict | None = None  # {challenger, base, difference, interval}


def beats_base(challenger: dict, base: dict) -> bool:
    return challenger["val"]["loss"] < base["val"]["loss"]


def quality(scores: dict) -> float:
    return quality_score(scores["golden"]["overall"])


def golden_regressions(challenger: dict, champion: dict, tolerance: float) -> dict[str, dict[str, float]]:
    """Strict golden metrics (and the wild part's, as ``wild <metric>``) more than ``tolerance`` below the
    champion's."""
    from finpipe.evaluation.end_to_end import wild_quality

    out = {}
    for metric in GUARDED_METRICS:
        new, old = challenger["golden"]["overall"].get(metric), champion["golden"]["overall"].get(metric)
        if new is not None and old is not None and new < old - tolerance:
            out[metric] = {"champion": old, "challenger": new}
    new_wild, old_wild = wild_quality(challenger.get("end_to_end")), wild_quality(champion.get("end_to_end"))
    for metric, new in new_wild.items():
        old = old_wild.get(metric)
        if new is not None and old is not None and new < old - tolerance:
            out[f"wild {metric}"] = {"champion": old, "challenger": new}
    return out


def forgetting_check(challenger: dict, base: dict, tolerance: float) -> dict | None:
    """The probe comparison, with ``forgot`` True when the challenger is clearly below the base; None when either
    was not probed."""
    new, old = challenger.get("forgetting"), base.get("forgetting")
    if not new or not old:
        return None
    paired = paired_difference_ci([float(r["right"]) for r in new["rows"]], [float(r["right"]) for r in old["rows"]])
    difference, lo, hi = paired if paired else (new["score"] - old["score"], None, None)
    forgot = new["score"] < old["score"] - tolerance and hi is not None and hi < 0
    return {"challenger": new["score"], "base": old["score"], "difference": round(difference, 4),
            "interval": [lo, hi], "forgot": forgot}


def decide(challenger: dict, base: dict, champion: dict | None, tolerance: float, same_base: bool = True,
           forgetting_tolerance: float = 0.10) -> Decision:
    if not beats_base(challenger, base):
        return Decision(False, f"validation loss {challenger['val']['loss']:.4f} does not beat the base model's "
                               f"{base['val']['loss']:.4f}", beats_base=False)
    forgetting = forgetting_check(challenger, base, forgetting_tolerance)
    if forgetting and forgetting["forgot"]:
        return Decision(False, f"forgets general skills: forgetting probe {forgetting['challenger']:.3f} vs base "
                               f"{forgetting['base']:.3f} (difference {forgetting['difference']:+.3f}, 95% interval "
                               f"{forgetting['interval'][0]:+.3f} .. {forgetting['interval'][1]:+.3f})",
                        beats_base=True, forgetting=forgetting)
    if champion is None:
        return Decision(True, "first champion: beats the base model on validation loss "
                              f"({challenger['val']['loss']:.4f} < {base['val']['loss']:.4f})", beats_base=True,
                        forgetting=forgetting)
    regressions = golden_regressions(challenger, champion, tolerance)
    if regressions:
        worst = ", ".join(f"{k} {v['challenger']:.3f} < champion {v['champion']:.3f} - {tolerance}"
                          for k, v in regressions.items())
        return Decision(False, f"regresses on the golden set: {worst}", beats_base=True, regressions=regressions,
                        forgetting=forgetting)
    new, old = quality(challenger), quality(champion)
    if new > old:
        return Decision(True, f"golden strict quality {new:.3f} > champion {old:.3f}, no regression", beats_base=True,
                        forgetting=forgetting)
    if new == old and same_base and challenger["golden"]["loss"] < champion["golden"]["loss"]:
        return Decision(True, f"golden strict quality equal ({new:.3f}), golden loss {challenger['golden']['loss']:.4f} "
                              f"< champion {champion['golden']['loss']:.4f}", beats_base=True, forgetting=forgetting)
    return Decision(False, f"golden strict quality {new:.3f} does not improve on the champion's {old:.3f}",
                    beats_base=True, forgetting=forgetting)
