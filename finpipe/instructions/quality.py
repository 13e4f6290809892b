"""Great Expectations quality gates for instruction samples.

The samples are flattened into one pandas frame (one row per sample, with the derived columns the
expectations need) and validated by one GX suite in an ephemeral, offline context. Each expectation
belongs to a named gate; the Dagster layer turns every gate into a blocking asset check.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from finpipe.instructions.factcheck import unsupported_numbers
from finpipe.instructions.samples import Sample
from finpipe.instructions.tokens import TokenCounter, estimate_tokens

ROLE_ORDER = "system,user,assistant"
NAN_TEXT = r"(?i)(?<![\w-])(nan|[+-]?inf|infinity|none|null)(?![\w-])"

#: gate name -> what it guarantees (shown as the asset check's description)
GATES = {
    "schema_and_ranges": "required fields present and non-null; answer and question lengths within range",
    "unique_ids": "no two samples share an id",
    "role_order": "every sample is exactly system -> user -> assistant",
    "token_budget": "every sample fits the configured max sequence length",
    "no_nan_text": "no NaN/inf/None rendered into any message",
    "family_balance": "each grounded family's share of samples is within [0.5, 2] x uniform",
    "fact_check": "every number in an answer appears in (or derives from) its context: grounded samples' market "
                  "data, an external record's own instruction",
    "no_control_or_injection": "no chat-template control tokens and no instruction-injection text in any message",
}
#: text that would become real chat turns when tokenized, or that tries to override the system prompt
CONTROL_OR_INJECTION = (r"(?i)<\|[a-z_]+\|>|</?s>|\[/?INST\]|<<SYS>>|"
                        r"(ignore|disregard|forget)\s+(all\s+|any\s+)?(the\s+)?(previous|prior|above|earlier)\s+"
                        r"(instructions|prompts?|messages)|\bnew system prompt\b|\byou are now\b")
REQUIRED_COLUMNS = ["sample_id", "family", "origin", "roles", "user_text", "assistant_text", "all_text",
                    "content_text", "tokens", "fact_check", "family_share"]


@dataclass
class GateResult:
    name: str
    passed: bool
    description: str
    failures: list[dict] = field(default_factory=list)  # per failed expectation: type, column, counts, examples


@dataclass
class SuiteResult:
    gates: dict[str, GateResult]
    raw: dict  # the GX validation result as JSON

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates.values())


def samples_frame(samples: list[Sample], count_tokens: TokenCounter = estimate_tokens):
    import pandas as pd

    grounded = [s for s in samples if s.grounded]
    shares: dict[str, float] = {}
    for s in grounded:
        shares[s.family] = shares.get(s.family, 0) + 1 / len(grounded)
    rows = []
    for s in samples:
        user, answer = s.text_of("user"), s.text_of("assistant")
        # grounded samples against their market data; external records against their own instruction (an
        # invented "AAPL closed at 999999.99" has nothing to stand on)
        unsupported = unsupported_numbers(answer, user)
        fact = "pass" if not unsupported else "fail: " + ", ".join(unsupported[:5])
        rows.append({
            "sample_id": s.id,
            "family": s.family,
            "origin": s.origin,
            "roles": ",".join(str(m.get("role")) for m in s.messages),
            "user_text": user or None,
            "assistant_text": answer or None,
            "all_text": "\n".join(str(m.get("content")) for m in s.messages),
            # what users and answers say (finpipe's own system prompt is the one text allowed to instruct)
            "content_text": "\n".join(str(m.get("content")) for m in s.messages if m.get("role") != "system"
                                      or s.origin != "finpipe"),
            "tokens": count_tokens(s.messages),
            "fact_check": fact,
            "family_share": shares.get(s.family) if s.grounded else None,
        })
    return pd.DataFrame(rows, columns=REQUIRED_COLUMNS)


def _suite(max_seq_len: int, n_grounded_families: int):
    import great_expectations as gx
    import great_expectations.expectations as gxe

    uniform = 1 / max(n_grounded_families, 1)
    spec = [
        ("schema_and_ranges", gxe.ExpectTableColumnsToMatchSet(column_set=REQUIRED_COLUMNS, exact_match=True)),
        *[("schema_and_ranges", gxe.ExpectColumnValuesToNotBeNull(column=c))
          for c in ("sample_id", "family", "roles", "user_text", "assistant_text")],
        ("schema_and_ranges", gxe.ExpectColumnValueLengthsToBeBetween(column="assistant_text", min_value=2, max_value=4000)),
        ("schema_and_ranges", gxe.ExpectColumnValueLengthsToBeBetween(column="user_text", min_value=2, max_value=8000)),
        ("unique_ids", gxe.ExpectColumnValuesToBeUnique(column="sample_id")),
        ("role_order", gxe.ExpectColumnValuesToBeInSet(column="roles", value_set=[ROLE_ORDER])),
        ("token_budget", gxe.ExpectColumnValuesToBeBetween(column="tokens", min_value=1, max_value=max_seq_len)),
        ("no_nan_text", gxe.ExpectColumnValuesToNotMatchRegex(column="all_text", regex=NAN_TEXT)),
        ("family_balance", gxe.ExpectColumnValuesToBeBetween(column="family_share", min_value=0.5 * uniform,
                                                              max_value=min(1.0, 2 * uniform))),
        ("fact_check", gxe.ExpectColumnValuesToBeInSet(column="fact_check", value_set=["pass"])),
        ("no_control_or_injection", gxe.ExpectColumnValuesToNotMatchRegex(column="content_text",
                                                                          regex=CONTROL_OR_INJECTION)),
    ]
    suite = gx.ExpectationSuite(name="instruction_samples")
    for gate, expectation in spec:
        expectation.meta = {"gate": gate}
        suite.add_expectation(expectation)
    return suite


def validate_samples(samples: list[Sample], max_seq_len: int, count_tokens: TokenCounter = estimate_tokens) -> SuiteResult:
    """Run the GX suite; every gate passes or lists its failing expectations with examples."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no telemetry, ever
    import great_expectations as gx

    frame = samples_frame(samples, count_tokens)
    n_families = frame.loc[frame["family_share"].notna(), "family"].nunique()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False, "metric_calculations": False}
    batch = (
        context.data_sources.add_pandas("finpipe")
        .add_dataframe_asset("instruction_samples")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    result = batch.validate(_suite(max_seq_len, n_families), result_format="SUMMARY")
    gates = {name: GateResult(name, True, text) for name, text in GATES.items()}
    for r in result.results:
        if r.success:
            continue
        gate = gates[r.expectation_config.meta["gate"]]
        gate.passed = False
        details = r.result or {}
        gate.failures.append({
            "expectation": r.expectation_config.type,
            "column": r.expectation_config.kwargs.get("column"),
            "unexpected_count": details.get("unexpected_count"),
            "examples": [v if not isinstance(v, float) or math.isfinite(v) else str(v)
                         for v in (details.get("partial_unexpected_list") or [])[:5]],
            "exception": (r.exception_info or {}).get("exception_message") if r.exception_info else None,
        })
    return SuiteResult(gates=gates, raw=result.to_json_dict())
