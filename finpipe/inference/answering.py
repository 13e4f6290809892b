"""The one path a question takes to an answer: ground -> refuse -> generate -> verify (-> retry or abstain).

``finpipe ask``, ``chat``, ``demo``, ``serve`` and the end-to-end evaluation all answer through here, so what the
evaluation scores is what a user gets, and every front end states the same verdict for the same answer. The
model is reached through a ``Generate`` callable (in-process ``generate``, the server's queue, a batch), so this
module knows nothing of how tokens are produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from finpipe.evaluation.generation import DecodeSpec, Generated, Sampling
from finpipe.inference.context import Grounding, check_question, ground, refusal
from finpipe.instructions.samples import SYSTEM_PROMPT
from finpipe.serving.verify import UNGROUNDED, VERIFIED, Verdict, verify
from finpipe.settings import setting

ON_UNVERIFIED = ("flag", "abstain", "retry")
REFUSED = "refused"
#: sampled retries after an unverified greedy answer, and their temperature
RETRIES, RETRY_TEMPERATURE = 2, 0.7
ABSTAIN = ("I cannot state this reliably: my answer did not match the market data ({problems}). "
           "Please check the figures in the lake directly.")

Generate = Callable[[list[dict[str, str]], Sampling], Generated]


@dataclass(frozen=True)
class AnswerSpec(DecodeSpec):
    """How ``ask``, ``chat`` and ``serve`` answer: the decoding weights, and what happens to an unverified answer."""

    on_unverified: str = setting("flag", "an answer that does not match the market data: 'flag' (answer, with the "
                                 "verdict), 'abstain' (say so instead), or 'retry' (sample again, up to twice, and "
                                 "keep the first verified answer; else flag)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_policy(self.on_unverified)


@dataclass
class Prepared:
    """A question grounded and, unless refused, turned into the chat the model answers."""

    grounding: Grounding
    refusal: str | None
    messages: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Answer:
    text: str
    prepared: Prepared
    verdict: Verdict | None  # None when refused (the model was not asked)
    attempts: int = 0
    generated: Generated | None = None
    #: the model's own text when ``abstain`` replaced it
    withheld: str | None = None

    @property
    def grounding(self) -> Grounding:
        return self.prepared.grounding

    @property
    def status(self) -> str:
        return REFUSED if self.verdict is None else self.verdict.status

    def status_line(self) -> str:
        """The verdict and the data's date in one line, for stderr: 'verified (market data as of 2013-03-01)'."""
        said = REFUSED if self.verdict is None else self.verdict.line()
        when = f" (market data as of {self.grounding.as_of})" if self.grounding.as_of else ""
        return f"{said}{when}"


def check_policy(on_unverified: str) -> str:
    if on_unverified not in ON_UNVERIFIED:
        raise ValueError(f"on_unverified must be one of {', '.join(ON_UNVERIFIED)}, got {on_unverified!r}")
    return on_unverified


def prepare(question: str, facts, allow_ungrounded: bool = False,
            conversation: Sequence[dict[str, str]] | None = None, system_prompt: str = SYSTEM_PROMPT) -> Prepared:
    """Ground ``question`` in ``facts`` (a ``LakeFacts``) and decide whether to refuse it. ``conversation``: earlier
    turns of a chat (a system turn included or not); the question becomes its last user turn, grounded."""
    grounding = ground(check_question(question), facts)
    refused = refusal(grounding, facts.tickers())
    if refused and not (allow_ungrounded and not grounding.context and not grounding.out_of_scope
                        and not grounding.ambiguous):
        return Prepared(grounding, refused)
    messages = [dict(m) for m in conversation or []]
    if not messages or messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": grounding.user})
    return Prepared(grounding, None, messages)


def answer(prepared: Prepared, generate: Generate, sampling: Sampling, on_unverified: str = "flag") -> Answer:
    """Generate (unless refused) and verify, with the ``on_unverified`` policy applied."""
    check_policy(on_unverified)
    if prepared.refusal is not None:
        return Answer(prepared.refusal, prepared, None)
    result = generate(prepared.messages, sampling)
    verdict, attempts = verify(result.text, prepared.grounding), 1
    retry = replace(sampling, temperature=max(sampling.temperature, RETRY_TEMPERATURE))
    while on_unverified == "retry" and verdict.status not in (VERIFIED, UNGROUNDED) and attempts <= RETRIES:
        attempts += 1
        candidate = generate(prepared.messages, retry)
        candidate_verdict = verify(candidate.text, prepared.grounding)
        if candidate_verdict.status == VERIFIED:
            result, verdict = candidate, candidate_verdict
    return finish(prepared, result, verdict, attempts, on_unverified)


def finish(prepared: Prepared, result: Generated, verdict: Verdict | None = None, attempts: int = 1,
           on_unverified: str = "flag") -> Answer:
    """The answer for a generated text (verified here unless ``verdict`` is given), with ``abstain`` applied."""
    verdict = verdict or verify(result.text, prepared.grounding)
    if on_unverified == "abstain" and verdict.status not in (VERIFIED, UNGROUNDED):
        return Answer(ABSTAIN.format(problems="; ".join(verdict.problems[:3])), prepared, verdict, attempts, result,
                      withheld=result.text)
    return Answer(result.text, prepared, verdict, attempts, result)
