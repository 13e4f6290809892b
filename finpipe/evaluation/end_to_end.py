"""End-to-end evaluation: questions answered the way ``finpipe ask`` and ``finpipe serve`` answer them.

The golden set's own scores give the model the *ideal* context (each sample carries its family's block). A user's
question instead goes through ``finpipe.inference.answering``: ``ground()`` decides which facts the model sees,
out-of-scope and unknown questions are refused, and the answer is verified. Here every golden question, and the
wild part (``finpipe.evaluation.wild``), takes that same path, with the lake as it stood on the sample's date
(``LakeFacts(as_of=...)``), and is scored strictly against the sample's facts.

Parts: ``seen`` and ``paraphrase`` (the golden questions), ``wild`` (as people type them) and ``unanswerable``
(correct only when the answer says the data does not cover it and states no number the data lacks).
Metrics per grounded answer: the strict ones, format validity, **relevance** (the verifier's judgement that the
answer speaks about what was asked) and **verified** (the verifier passed it, as ``serve`` would report).

Generation is batched (greedy, the model's full weights, as the golden scores); a prompt identical to one the
golden scoring already answered reuses that answer instead of generating it again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Sequence

from finpipe.evaluation import metrics as m
from finpipe.evaluation.generation import Generated
from finpipe.evaluation.golden import part_of
from finpipe.evaluation.stats import bootstrap_ci
from finpipe.evaluation.strict import strict_score
from finpipe.evaluation.wild import UNANSWERABLE, WildQuestion, build_wild, declines, wild_hash
from finpipe.inference.answering import RETRIES, Answer, finish, prepare
from finpipe.instructions.factcheck import numbers_in
from finpipe.instructions.samples import Sample
from finpipe.serving.verify import VERIFIED

E2E_PARTS = ("seen", "paraphrase", "wild", UNANSWERABLE)
E2E_METRICS = ("number_correctness", "label_correctness", "exact_match", "format_validity", "relevance", "verified")
UNANSWERABLE_METRICS = ("refusal_correctness", "invented_numbers")

GenerateMany = Callable[[list[list[dict[str, str]]]], list[Generated]]


@dataclass
class EndToEndSet:
    """What to ask: the golden questions and the wild ones, and the lake to ground them in."""

    questions: list[WildQuestion]
    facts_for: Callable[[str | None], object]  # as-of date -> a LakeFacts seeing the lake as on that date

    @property
    def digest(self) -> str:
        return wild_hash(self.questions)


def golden_questions(golden: Sequence[Sample]) -> list[WildQuestion]:
    """Each golden sample's question alone, as a user would send it."""
    return [WildQuestion(s.text_of("user").rsplit("Question: ", 1)[-1].strip(), s.family, list(s.tickers), s.as_of,
                         s, s.id, part_of(s)) for s in golden if s.facts]


def build_set(golden: Sequence[Sample], lake, seed: int = 0) -> EndToEndSet:
    """The golden questions and the wild part, grounded in ``lake`` (a ``PriceLake``), read into memory once."""
    from finpipe.inference.context import LakeFacts
    from finpipe.serving.facts import LakeSnapshot

    snapshot = LakeSnapshot(lake.path, log=lambda _: None, sessions=None)
    cache: dict[str | None, LakeFacts] = {}

    def facts_for(as_of: str | None) -> LakeFacts:
        if as_of not in cache:
            cache[as_of] = LakeFacts(snapshot, as_of=as_of)
        return cache[as_of]

    names = facts_for(None).names()
    return EndToEndSet(golden_questions(golden) + build_wild(golden, names, seed), facts_for)


def answer_all(items: Sequence[WildQuestion], facts_for, generate_many: GenerateMany,
               known: dict[str, str] | None = None, resample: GenerateMany | None = None) -> list[Answer]:
    """Every question through the answering path; each distinct prompt generated once (``known``: prompt key ->
    an answer already generated for exactly that prompt). ``resample``: the ``retry`` policy, batched: each
    unverified answer is sampled again (``RETRIES`` times at most) and the first verified sample kept."""
    prepared = [prepare(q.question, facts_for(q.as_of)) for q in items]
    known = dict(known or {})
    todo: dict[str, list[dict[str, str]]] = {}
    for p in prepared:
        if p.refusal is None and (key := prompt_key(p.messages)) not in known:
            todo.setdefault(key, p.messages)
    if todo:
        for key, generated in zip(todo, generate_many(list(todo.values()))):
            known[key] = generated.text
    answers = []
    for p in prepared:
        if p.refusal is not None:
            answers.append(Answer(p.refusal, p, None))
        else:
            answers.append(finish(p, Generated(known[prompt_key(p.messages)], 0, 0.0)))
    for _ in range(RETRIES if resample is not None else 0):
        again = [i for i, a in enumerate(answers) if a.verdict is not None and a.status != VERIFIED
                 and a.grounding.context]
        if not again:
            break
        for i, generated in zip(again, resample([answers[i].prepared.messages for i in again])):
            candidate = finish(answers[i].prepared, generated)
            attempts = answers[i].attempts + 1
            answers[i] = candidate if candidate.status == VERIFIED else answers[i]
            answers[i].attempts = attempts
    return answers


def prompt_key(messages: list[dict[str, str]]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def score_row(item: WildQuestion, result: Answer) -> dict:
    """One answer's end-to-end metrics, against the facts of the sample it re-asks."""
    row = {"part": item.part, "family": item.family, "question": item.question, "as_of": item.as_of,
           "tickers": ",".join(item.tickers), "answer": result.text, "verdict": result.status,
           "problems": result.verdict.problems if result.verdict else [],
           "grounded_as": result.grounding.family or ",".join(result.grounding.families) or None}
    if item.sample is None:  # unanswerable: right only when declined, with no number the data lacks
        invented = _invented(result)
        return row | {"refusal_correctness": float(declines(result.text) and not invented),
                      "invented_numbers": float(invented)}
    context = result.grounding.user if result.grounding.context else ""
    strict = strict_score(item.family, item.sample.facts, item.sample.labels, context, result.text)
    return row | {
        "number_correctness": strict.number_correctness if strict.number_correctness is not None else 0.0,
        "label_correctness": strict.label_correctness,
        "exact_match": strict.exact_match,
        "format_validity": float(m.format_valid(result.text)),
        "relevance": float(bool(result.verdict and result.verdict.relevant)),
        "verified": float(result.status == VERIFIED),
        "reference": item.sample.text_of("assistant"),
        "problems": list(dict.fromkeys(strict.problems + row["problems"])),
    }


def _invented(result: Answer) -> bool:
    """Whether an answer states a number the market data does not hold (a refusal states none)."""
    if result.verdict is None:
        return False
    if not result.grounding.context:  # nothing to support any number
        return bool(numbers_in(result.text)[0])
    return any(not p.startswith("off the question") and ": names " not in p for p in result.verdict.problems)


def _means(rows: Sequence[dict], metrics: Sequence[str]) -> dict[str, float | None]:
    out = {}
    for name in metrics:
        values = [r[name] for r in rows if r.get(name) is not None]
        out[name] = round(sum(values) / len(values), 4) if values else None
    return out


def _intervals(rows: Sequence[dict], metrics: Sequence[str], seed: int) -> dict[str, list[float] | None]:
    out = {}
    for name in metrics:
        interval = bootstrap_ci([r[name] for r in rows if r.get(name) is not None], seed=seed)
        out[name] = list(interval) if interval else None
    return out


def summarize(rows: Sequence[dict], seed: int = 0) -> dict:
    """Per part (and over the grounded parts together): metric means with bootstrap 95% intervals, and the wild
    part per family."""
    parts: dict[str, dict] = {}
    for part in E2E_PARTS:
        group = [r for r in rows if r["part"] == part]
        if not group:
            continue
        metrics = UNANSWERABLE_METRICS if part == UNANSWERABLE else E2E_METRICS
        parts[part] = {"n": len(group), "means": _means(group, metrics), "ci": _intervals(group, metrics, seed)}
    grounded = [r for r in rows if r["part"] != UNANSWERABLE]
    wild = [r for r in rows if r["part"] == "wild"]
    return {"overall": _means(grounded, E2E_METRICS), "ci": _intervals(grounded, E2E_METRICS, seed), "parts": parts,
            "wild_per_family": {f: _means([r for r in wild if r["family"] == f], E2E_METRICS)
                                for f in sorted({r["family"] for r in wild})}}


def evaluate_end_to_end(questions: EndToEndSet, generate_many: GenerateMany, known: dict[str, str] | None = None,
                        seed: int = 0, resample: GenerateMany | None = None) -> dict:
    """Answer and score every question: ``{"summary", "rows", "digest"}``; ``resample``: answer with the ``retry``
    policy (rows then carry their attempts)."""
    answers = answer_all(questions.questions, questions.facts_for, generate_many, known, resample)
    rows = [score_row(q, a) | {"attempts": a.attempts} for q, a in zip(questions.questions, answers)]
    return {"summary": summarize(rows, seed), "rows": rows, "digest": questions.digest}


def wild_quality(end_to_end: dict | None) -> dict[str, float | None]:
    """The wild part's strict metrics and relevance (what promotion guards), {} when there is none."""
    if not end_to_end:
        return {}
    wild = end_to_end.get("summary", end_to_end).get("parts", {}).get("wild")
    return {k: wild["means"].get(k) for k in ("number_correctness", "label_correctness", "relevance")} if wild else {}
