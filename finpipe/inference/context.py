"""Ground a free-text question in the lake's latest facts, in exactly the format the model was trained on.

A question names tickers ("How is AAPL doing vs msft?"); their latest statistics row becomes the context
block of the user turn, rendered by the same family renderers the training samples use
(``finpipe.instructions.families``), so the model sees the layout, labels and number formats it learned.
One ticker: the union of the context lines of the families the question asks about (all of them when it
names none). Two tickers: the comparison context, on their latest common date.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from finpipe.instructions import families as fam
from finpipe.instructions.samples import SYSTEM_PROMPT
from finpipe.statistics.measures import RETURN_WINDOWS

STATISTICS_TABLE = "price_statistics"
#: the N of "N-day return" the performance and comparison families choose from
WINDOWS: tuple[int, ...] = tuple(RETURN_WINDOWS[1:])
#: the comparison window when the question names no number of days
DEFAULT_WINDOW = 30

# Which single-ticker families a question asks about. Every phrasing the training samples use maps to
# exactly its own family (tested), so a training question gets its training context back; the everyday words
# people type ("is X in a slump", "aapl px", "overheated") map to the family whose facts answer them.
FAMILY_PATTERNS: dict[str, re.Pattern[str]] = {
    "price": re.compile(r"\bprices?\b|(?<!how )\bclos(?:e|ed|ing)\b(?! to\b)|\bopen(?:ed|ing)?\b|\bvolume\b"
                        r"|\bsession\b|\btraded\b|\bintraday\b|\bpx\b|\bquote\b|\btrading day\b|\bday'?s range\b", re.I),
    "performance": re.compile(r"\bperform|\breturns?\b|\bgain|\bup or down\b|\bfare[ds]?\b"
                              r"|\brising\b|\bfalling\b|\brall(?:y|ied)\b|\b(?:this|past|last) (?:week|month)\b"
                              r"|\bweekly\b|\bmonthly\b|\b(?:two|2) weeks\b|\bfortnight\b"
                              r"|\d+\s+(?:trading\s+)?(?:days|sessions)\b|\b\d+\s?d\b|\b\d+-day (?:return|move|change)",
                              re.I),
    "volatility": re.compile(r"\bvolatil|\brisk|\bvol\b|\bswings?\b|\bturbulen|\bchoppy\b|\bjumpy\b|\bcalm\b"
                             r"|\bstable\b", re.I),
    "trend": re.compile(r"\b(?:up|down)?trend|\bmoving averages?\b|\bsmas?\b|\bmas\b|\b\d+\s*-?\s*d(?:ay)? ma\b"
                        r"|\bdirection\b|\bheading\b|\baverages\b|\bsideways\b", re.I),
    "momentum": re.compile(r"\brsi\b|\bmomentum\b|\boverbought\b|\boversold\b|\boverheat|\bover-?extended\b"
                           r"|\bstretched\b|\bbuying pressure\b|\bselling pressure\b", re.I),
    "range": re.compile(r"\b52[- ]?(?:week|wk|w)\b|\bdrawdown\b|\byear(?:ly)? (?:high|low|peak)\b|\bcorrection\b"
                        r"|\bbear market\b|\bslump|\bpeak\b|\bone-year\b|\b1-year\b|\b12-month\b"
                        r"|\bfrom (?:its|the) (?:high|top|low)s?\b|\boff (?:its|the) (?:high|highs|top)\b"
                        r"|\bhigh of the (?:past|last) year\b|\byearly\b", re.I),
}
#: what a question that names no family gets: the latest session's summary, the one context every ticker has
DEFAULT_FAMILY = "price"
# "over the last 14 trading days", "past 7 sessions", "Over 30 days", "the 5-day return", "7d"
_WINDOW_RE = re.compile(r"\b(\d{1,3})[- ]?(?:trading[- ])?(?:days?|sessions?|d)\b", re.I)
# a question about one session's move
_ONE_DAY = re.compile(r"\btoday\b|\byesterday\b|\bon the day\b|\b(?:1|one)[- ]day\b|\bdaily\b", re.I)
#: everyday spans, as the return window the statistics have that matches them
_WINDOW_WORDS: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"\b(?:two|2) weeks\b|\bfortnight\b", re.I), 14),
    (re.compile(r"\b(?:this|past|last|the) week\b|\bweekly\b", re.I), 5),
    (re.compile(r"\b(?:this|past|last|the) month\b|\bmonthly\b", re.I), 30),
)
# tickers this short are common words ("A", "T", "GE"...): they must be written in capitals
_CASE_SENSITIVE_MAX_LEN = 2


class PinnedWindow(random.Random):
    """A generator that picks ``window`` whenever a renderer draws the return window.

    The performance and comparison renderers draw N with ``rng.choice(RETURN_WINDOWS[1:])``; pinning that
    draw renders the context (and reference answer) for the N the question names with the renderers' own
    code, instead of a copy of their format that could drift from the training samples.
    """

    def __init__(self, window: int, seed: int = 0) -> None:
        super().__init__(seed)
        self.window = window

    def choice(self, seq: Sequence):  # type: ignore[override]
        if tuple(seq) == WINDOWS:
            return self.window
        return super().choice(seq)


def _aliases(known: Iterable[str]) -> dict[str, str]:
    """Upper-case spelling -> ticker: the symbol itself, plus ``NSEI`` for ``^NSEI`` and ``TCS`` for ``TCS.NS``
    when that shorter spelling is unambiguous (not another ticker, not shared by two tickers)."""
    tickers = sorted(set(known))
    exact = {t.upper(): t for t in tickers}
    short: dict[str, set[str]] = {}
    for t in tickers:
        bare = t.lstrip("^").split(".")[0].upper()
        if bare and bare != t.upper():
            short.setdefault(bare, set()).add(t)
    out = dict(exact)
    for bare, owners in short.items():
        if len(owners) == 1 and bare not in exact:
            out[bare] = next(iter(owners))
    return out


class AmbiguousNameError(ValueError):
    """A company name in the question that fits several of the lake's tickers ("Alphabet": GOOG or GOOGL)."""


#: everyday names people type for companies and indices, beside the names in the lake's ``instruments`` table;
#: an alias counts only for the tickers the lake holds
COMMON_ALIASES: dict[str, tuple[str, ...]] = {
    "google": ("GOOG", "GOOGL"), "alphabet": ("GOOG", "GOOGL"), "big blue": ("IBM",), "microsoft": ("MSFT",),
    "apple": ("AAPL",), "facebook": ("META", "FB"), "meta": ("META", "FB"), "amazon": ("AMZN",),
    "nvidia": ("NVDA",), "jpmorgan": ("JPM",), "jp morgan": ("JPM",), "nifty": ("^NSEI",), "nifty 50": ("^NSEI",),
    "sensex": ("^BSESN",), "bank nifty": ("^NSEBANK",), "reliance": ("RELIANCE.NS",), "infosys": ("INFY.NS",),
}
# legal-form words at the end of a company name: "Apple Inc." is "apple", "Alphabet Inc. class C" is "alphabet"
_LEGAL_SUFFIX = re.compile(r"[,\s]+(?:inc|incorporated|corp|corporation|co|company|ltd|limited|plc|ag|sa|nv"
                           r"|holdings|group|class [a-z]|& co)\.?$", re.I)


def _without_legal_forms(name: str) -> list[str]:
    """A name without its parenthesised part, then without each legal-form word in turn from the end:
    "Alphabet Inc. class C" -> ["Alphabet Inc. class C", "Alphabet Inc.", "Alphabet"]."""
    forms = [" ".join(re.sub(r"\([^)]*\)", " ", name).split())]
    while (shorter := _LEGAL_SUFFIX.sub("", forms[-1]).strip(" ,.")) != forms[-1]:
        forms.append(shorter)
    return forms


def name_aliases(names: dict[str, str], known: Iterable[str]) -> dict[str, set[str]]:
    """Lower-case company names -> the known tickers they name: each instrument's name as the lake holds it,
    without its legal form ("apple inc." and "apple"), a parenthesised other name ("(Google)"), and
    ``COMMON_ALIASES``. A name that fits two tickers stays in, with both: naming it is ambiguous."""
    known = set(known)
    out: dict[str, set[str]] = {}
    for ticker, name in names.items():
        if ticker not in known or not name or name.upper() == ticker.upper():
            continue
        lowered = " ".join(name.lower().split())
        forms = {m.strip() for m in re.findall(r"\(([^)]+)\)", lowered)}
        forms.update(_without_legal_forms(lowered))
        for form in forms:
            if len(form) >= 3 and form.upper() != ticker.upper():
                out.setdefault(form, set()).add(ticker)
    for alias, targets in COMMON_ALIASES.items():
        present = {t for t in targets if t in known}
        if present:
            out.setdefault(alias, set()).update(present)
    return out


def common_name(ticker: str, names: dict[str, str]) -> str:
    """What a person calls the instrument: a parenthesised other name ("Google"), else the name without its legal
    form ("Apple"), else the ticker."""
    name = names.get(ticker) or ticker
    other = re.findall(r"\(([^)]+)\)", name)
    if other:
        return other[0].strip()
    return _without_legal_forms(name)[-1] or ticker


def find_tickers(question: str, known: Iterable[str], names: dict[str, str] | None = None) -> list[str]:
    """Known tickers named in ``question`` as whole words, case-insensitively, in order of first mention: by
    symbol ("$AAPL", "AAPL's", "aapl") or by company name ("Apple", "apple inc", "Google": ``name_aliases``).

    "AAPLX" and "AAPL.NS" do not name AAPL. Tickers of one or two letters must be written in capitals, or every
    "a" would name Agilent. A name that fits several tickers raises ``AmbiguousNameError``.
    """
    known = list(known)
    aliases = _aliases(known)
    mentions: list[tuple[int, str]] = []
    if aliases:
        alternation = "|".join(re.escape(a) for a in sorted(aliases, key=len, reverse=True))
        # not glued to a word, a caret or a dotted suffix on either side
        pattern = re.compile(rf"(?<![\w^.])(?:{alternation})(?![\w^]|\.\w)", re.I)
        for match in pattern.finditer(question):
            text = match.group(0)
            alias = text.upper()
            if len(alias) <= _CASE_SENSITIVE_MAX_LEN and text != alias:
                continue
            if alias in aliases:  # a letter whose case folds to two ("ß", dotted "İ") matches but is no key
                mentions.append((match.start(), aliases[alias]))
    by_name = name_aliases(names or {}, known)
    if by_name:
        alternation = "|".join(re.escape(a) for a in sorted(by_name, key=len, reverse=True))
        for match in re.finditer(rf"(?<![\w.&-])(?:{alternation})(?![\w&-])", question, re.I):
            targets = by_name.get(" ".join(match.group(0).lower().split()))
            if not targets:
                continue
            if len(targets) > 1:
                raise AmbiguousNameError(f"{match.group(0)!r} could mean {' or '.join(sorted(targets))}: "
                                         "name the ticker")
            mentions.append((match.start(), next(iter(targets))))
    found: list[str] = []
    for _, ticker in sorted(mentions, key=lambda m: m[0]):
        if ticker not in found:
            found.append(ticker)
    return found


def detect_families(question: str) -> tuple[str, ...]:
    """The single-ticker families the question asks about, in the canonical order. A question that names none
    ("what's up with IBM?") gets ``DEFAULT_FAMILY``: one family's block, the layout the model was trained on, and
    a short prompt (measured in docs/evaluation.md: the union of every family is slower and answers worse)."""
    return named_families(question) or (DEFAULT_FAMILY,)


def named_families(question: str) -> tuple[str, ...]:
    """The single-ticker families the question's words name, in the canonical order (none: it names none). A
    one-day question ("how much did AAPL gain today?", "AAPL's 1-day return") is the latest session's: the
    performance family's returns start at 3 days."""
    named = tuple(f for f, pattern in FAMILY_PATTERNS.items() if pattern.search(question))
    if "performance" in named and _ONE_DAY.search(question) and not _several_days(question):
        named = tuple(f for f in FAMILY_PATTERNS if f == "price" or (f in named and f != "performance"))
    return named


def _several_days(question: str) -> bool:
    match = _WINDOW_RE.search(question)
    return bool(match and int(match.group(1)) > 1) or any(p.search(question) for p, _ in _WINDOW_WORDS)


def _snapped(question: str, window: int) -> list[str]:
    """A note when the question asks for a window the statistics do not have ("90 days" answered for 30)."""
    match = _WINDOW_RE.search(question)
    if match and int(match.group(1)) not in (window, 1):
        return [f"finpipe keeps returns over {', '.join(map(str, WINDOWS))} trading days: answering for {window}, "
                f"not {match.group(1)}"]
    return []


def detect_window(question: str, default: int = DEFAULT_WINDOW) -> int:
    """The return window the question names ("over the last 14 trading days" -> 14, "this week" -> 5), snapped
    to the nearest window the statistics have (ties -> the shorter); ``default`` when it names none."""
    match = _WINDOW_RE.search(question)
    if not match:
        for pattern, window in _WINDOW_WORDS:
            if pattern.search(question):
                return window
        return default
    n = int(match.group(1))
    return min(WINDOWS, key=lambda w: (abs(w - n), w))


def context_lines(row: dict, families: Iterable[str], window: int = DEFAULT_WINDOW
                  ) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """The union of the families' context lines for one ticker's row (first occurrence of a label wins:
    a label always renders the same value), and the families whose statistics the row has. ``window``: the
    return window the question asks about (the performance lines lead with it, as in training)."""
    lines: list[tuple[str, str]] = []
    seen: set[str] = set()
    used: list[str] = []
    for family in families:
        render, needs = fam.SINGLE_TICKER_FAMILIES[family]
        if not fam.has_statistics(row, needs):  # e.g. no 52-week range in a ticker's first year
            continue
        used.append(family)
        for label, value in render(row, PinnedWindow(window)).context:
            if label not in seen:
                seen.add(label)
                lines.append((label, value))
    return lines, tuple(used)


class LakeFacts:
    """Read-only access to the newest statistics rows in the lake (a ``finpipe.market.lake.PriceLake``).

    ``as_of``: answer as the lake stood on that date (rows after it are invisible): what the end-to-end evaluation
    asks a golden question with, so a question about a past date goes through exactly the path a user's takes.
    """

    def __init__(self, lake, as_of: str | None = None) -> None:
        self.lake = lake
        self.as_of = as_of
        self._tickers: list[str] | None = None
        self._names: dict[str, str] | None = None

    def _tables(self) -> list[str]:
        return [r["table_name"] for r in self.lake.records("SELECT table_name FROM information_schema.tables")]

    def tickers(self) -> list[str]:
        """Tickers that have statistics, sorted."""
        if self._tickers is None:
            if STATISTICS_TABLE not in self._tables():
                raise FileNotFoundError(
                    f"the lake {self.lake.path} has no {STATISTICS_TABLE} table: run `finpipe run --only-data` first")
            self._tickers = [r["ticker"] for r in
                             self.lake.records(f"SELECT DISTINCT ticker FROM {STATISTICS_TABLE} ORDER BY ticker")]
        return self._tickers

    def names(self) -> dict[str, str]:
        """Ticker -> the instrument's name ("Apple Inc."), for the tickers the lake describes."""
        if self._names is None:
            self._names = {}
            if "instruments" in self._tables():
                self._names = {r["ticker"]: r["name"] for r in
                               self.lake.records("SELECT ticker, name FROM instruments WHERE name IS NOT NULL")}
        return self._names

    def _cutoff(self) -> tuple[str, list]:
        return ("AND date <= CAST(? AS DATE)", [self.as_of]) if self.as_of else ("", [])

    def _rows(self, where: str, params: list) -> dict[str, dict]:
        # open/high/low live in `prices` (the price family needs them), names in `instruments`,
        # as in the dataset builder; `as_of` and `name` are the fields the family renderers read
        rows = self.lake.records(
            f"""
            SELECT s.*, p.open, p.high, p.low, coalesce(i.name, s.ticker) AS name
            FROM {STATISTICS_TABLE} s
            LEFT JOIN prices p ON p.ticker = s.ticker AND p.date = s.date
            LEFT JOIN instruments i ON i.ticker = s.ticker
            WHERE {where}
            """,
            params,
        )
        return {row["ticker"]: row | {"as_of": row["date"].isoformat()} for row in rows}

    def latest(self, ticker: str) -> dict | None:
        """The ticker's newest statistics row (with open/high/low, name and ``as_of``), None if it has none."""
        cut, extra = self._cutoff()
        rows = self._rows(f"s.ticker = ? AND s.date = (SELECT max(date) FROM {STATISTICS_TABLE} WHERE ticker = ? {cut})",
                          [ticker, ticker, *extra])
        return rows.get(ticker)

    def latest_pair(self, a: str, b: str) -> tuple[dict, dict] | None:
        """Both tickers' rows on their newest common date (a comparison states one as-of date)."""
        cut, extra = self._cutoff()
        rows = self._rows(
            f"""s.ticker IN (?, ?) AND s.date = (
                SELECT max(date) FROM (SELECT date FROM {STATISTICS_TABLE} WHERE ticker IN (?, ?) {cut}
                                       GROUP BY date HAVING count(DISTINCT ticker) = 2))""",
            [a, b, a, b, *extra],
        )
        return (rows[a], rows[b]) if a in rows and b in rows else None


@dataclass
class Grounding:
    """A question with the lake's facts for the tickers it names, ready to send as a chat."""

    question: str
    tickers: list[str] = field(default_factory=list)
    family: str | None = None  # "comparison", a single family, or None for a union / no context
    families: tuple[str, ...] = ()
    as_of: str | None = None
    context: str | None = None  # the context block; None when the question names no known ticker
    reference: str | None = None  # the rule-based answer when the question maps to exactly one family
    notes: list[str] = field(default_factory=list)  # why the context is partial or missing, for stderr
    #: what the question asks that the lake does not hold ("P/E ratios", "news"): refused, never answered
    out_of_scope: str | None = None
    ambiguous: str | None = None  # a company name that fits several tickers: refused with the candidates
    #: a question about tickers the lake has that finpipe still does not answer (why, for the refusal)
    declined: str | None = None
    #: family -> (facts, labels) of the context: what an answer is verified against (finpipe.serving.verify)
    checks: dict[str, tuple[dict[str, str], dict[str, str]]] = field(default_factory=dict)
    #: the lake rows the context was rendered from (ticker -> statistics row): the only ground truth a verifier
    #: reads, never text from the user's turn
    rows: dict[str, dict] = field(default_factory=dict)
    window: int = DEFAULT_WINDOW  # the return window the question asks about

    @property
    def user(self) -> str:
        """The user turn: the training layout when there is context, else the bare question."""
        return f"{self.context}\n\nQuestion: {self.question}" if self.context else self.question

    def messages(self, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": self.user}]


def ground(question: str, facts: LakeFacts) -> Grounding:
    """Find the tickers in ``question`` and build its context from their latest facts.

    More than two tickers: the first two are compared (the model was trained on pairs), the rest noted.
    """
    question = question.strip()
    grounding = Grounding(question=question)
    known = facts.tickers()
    try:
        tickers = find_tickers(question, known, facts.names())
    except AmbiguousNameError as exc:
        grounding.ambiguous = str(exc)
        return grounding
    grounding.out_of_scope = out_of_scope(question)
    if grounding.out_of_scope:
        grounding.tickers = tickers[:2]
        return grounding
    if not tickers:
        shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
        grounding.notes.append(f"no known ticker in the question (the lake has: {shown}): asking without market data")
        return grounding
    if len(tickers) > 2:
        grounding.notes.append(f"the model compares two tickers at a time: using {tickers[0]} and {tickers[1]}, "
                               f"ignoring {', '.join(tickers[2:])}")
        tickers = tickers[:2]
    grounding.tickers = tickers

    if len(tickers) == 2:
        a, b = tickers
        named = named_families(question)
        # returns are what a pair is compared on; "price" with them ("price performance") asks the same
        others = [f for f in named if f != "performance" and not (f == "price" and "performance" in named)]
        if others:  # the model compares two tickers by their returns: "AAPL's RSI vs MSFT's" would get returns
            grounding.declined = (f"finpipe compares two tickers by their returns only; ask about the {' and '.join(others)} "
                                  f"of {a} and of {b} one ticker at a time")
            return grounding
        pair = facts.latest_pair(a, b)
        if pair is None or not all(fam.has_statistics(row, fam.COMPARISON_NEEDS) for row in pair):
            grounding.notes.append(f"{a} and {b} have no common date with complete statistics: "
                                   "asking without market data")
            return grounding
        window = detect_window(question)
        grounding.notes += _snapped(question, window)
        rendered = fam.comparison(pair[0], pair[1], PinnedWindow(window))
        grounding.rows, grounding.window = {a: pair[0], b: pair[1]}, window
        grounding.family, grounding.families = "comparison", ("comparison",)
        grounding.as_of = pair[0]["as_of"]
        grounding.context = fam.context_block(f"{a} and {b}", grounding.as_of, rendered.context)
        grounding.reference = rendered.answer
        grounding.checks = {"comparison": (rendered.facts, rendered.labels)}
        return grounding

    (ticker,) = tickers
    row = facts.latest(ticker)
    wanted = detect_families(question)
    lines, used = context_lines(row, wanted, detect_window(question)) if row else ([], ())
    if not lines:
        grounding.notes.append(f"{ticker} has no complete statistics for {', '.join(wanted)}: "
                               "asking without market data")
        return grounding
    missing = [f for f in wanted if f not in used]
    if missing:
        grounding.notes.append(f"{ticker} lacks the statistics for {', '.join(missing)} as of {row['as_of']}")
    grounding.families, grounding.as_of = used, row["as_of"]
    grounding.context = fam.context_block(fam.display_name(row), row["as_of"], lines)
    window = detect_window(question)
    if "performance" in used:
        grounding.notes += _snapped(question, window)
    grounding.rows, grounding.window = {ticker: row}, window
    for family in used:
        render, _ = fam.SINGLE_TICKER_FAMILIES[family]
        rendered = render(row, PinnedWindow(window))
        grounding.checks[family] = (rendered.facts, rendered.labels)
        if len(used) == 1:
            grounding.family, grounding.reference = family, rendered.answer
    return grounding


#: the demo's questions, one per family, phrased as the training samples phrase them
DEMO_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("price", "What was {t}'s latest closing price, and how did the session trade?"),
    ("performance", "How has {t} performed over the last 5 trading days?"),
    ("volatility", "How volatile is {t} right now?"),
    ("trend", "What is the trend for {t} relative to its moving averages?"),
    ("momentum", "Is {t} overbought or oversold?"),
    ("range", "How far is {t} from its 52-week high?"),
    ("comparison", "Which did better over the last 30 trading days, {t} or {u}?"),
)


def demo_questions(tickers: Sequence[str]) -> list[tuple[str, str]]:
    """(family, question) pairs over the lake's tickers, rotating through them; no comparison with one ticker."""
    if not tickers:
        raise ValueError("the lake has no tickers with statistics: run `finpipe run --only-data` first")
    out = []
    for i, (family, template) in enumerate(DEMO_QUESTIONS):
        if family == "comparison":
            if len(tickers) < 2:
                continue
            out.append((family, template.format(t=tickers[0], u=tickers[1])))
        else:
            out.append((family, template.format(t=tickers[i % len(tickers)])))
    return out


# --------------------------------------------------------------------------- questions without market data

_TICKERISH = re.compile(r"(?<![\w$^.])\$?([A-Z][A-Z0-9]{0,5}(?:\.[A-Z]{1,3})?)(?![\w])")
_NOT_TICKERS = {"I", "A", "RSI", "SMA", "OK", "US", "USD", "ETF", "CEO", "AI", "THE", "IS", "OR", "AND", "VS", "EPS"}
_CONTROL = re.compile(r"<\|[a-z_]+\|>|</?s>|\[/?INST\]")


def unknown_tickers(question: str, known: Iterable[str]) -> list[str]:
    """Capitalized words that look like tickers the lake does not have ("TSLA")."""
    known = set(known)
    found = [m.group(1) for m in _TICKERISH.finditer(question)]
    return [t for t in dict.fromkeys(found) if t not in known and t not in _NOT_TICKERS]


def check_question(question: str) -> str:
    """The question, stripped; an empty one or one carrying chat-template control tokens is refused."""
    question = question.strip()
    if not question:
        raise ValueError("the question is empty")
    token = _CONTROL.search(question)
    if token:
        raise ValueError(f"the question contains the chat-template control token {token.group(0)!r}: it would "
                         "become a chat turn of its own; remove it")
    return question


def refusal(grounding: Grounding, known: Sequence[str]) -> str | None:
    """What to say instead of answering a question the lake has no market data for (None: it has some)."""
    if grounding.ambiguous:
        return f"I can only answer about one instrument at a time by name, and {grounding.ambiguous}."
    if grounding.declined:
        return f"I cannot answer that from finpipe's market data as asked: {grounding.declined}."
    if grounding.out_of_scope:
        about = f" for {' and '.join(grounding.tickers)}" if grounding.tickers else ""
        return (f"finpipe's market data does not cover {grounding.out_of_scope}, so I cannot answer that. It "
                f"holds daily prices{about}: the latest session, returns over 1 to 30 days, volatility and drawdown, "
                "moving averages, RSI and the 52-week range.")
    if grounding.context:
        return None
    missing = unknown_tickers(grounding.question, known)
    shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
    what = f"no market data for {', '.join(missing)}" if missing else "no ticker of the lake in the question"
    return f"I can only answer from finpipe's market data, and there is {what}. The lake has: {shown}."


# --------------------------------------------------------------------------- questions the lake cannot answer

#: what the lake does not hold, and the words that ask for it; a question asking for one is refused, never
#: guessed at (a 135M model asked for a P/E invents one)
OUT_OF_SCOPE: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("valuation ratios such as P/E", re.compile(r"\bp\s*/\s*e\b|\bpe ratio|\bprice[- ]to[- ](?:earnings|book|sales|cash)"
                                                 r"|\bvaluation|\b(?:earnings|ebitda|revenue|sales) multiple|\bp/b\b"
                                                 r"|\bpeg\b|\bev/ebitda", re.I)),
    ("earnings and fundamentals", re.compile(r"\bearnings\b|\beps\b|\brevenue|\bsales\b|\bprofit|\bmargins?\b"
                                             r"|\bguidance\b|\bbalance sheet|\bcash flow|\bdebt\b|\bfundamental",
                                             re.I)),
    ("dividends", re.compile(r"\bdividend|\byield\b|\bbuybacks?\b", re.I)),
    ("market capitalisation", re.compile(r"\bmarket ?cap|\bshares outstanding\b|\bfloat\b", re.I)),
    ("news and events", re.compile(r"\bnews\b|\bheadlines?\b|\bannounce|\brumou?rs?\b|\bceo\b|\blawsuit"
                                   r"|\bwhy did\b|\bwhy is\b", re.I)),
    ("analyst opinions", re.compile(r"\banalysts?\b|\bratings?\b|\bupgrade|\bdowngrade|\bconsensus\b", re.I)),
    ("recommendations or forecasts", re.compile(
        r"\bshould (?:i|we|you)\b|\b(?:a|good|worth a) (?:buy|sell|hold)\b|\bbuy or sell\b|\b(?:buy|sell|hold)\?"
        r"|\bworth (?:buying|it)\b|\brecommend|\b(?:price )?target\b|\bforecast|\bpredict|\bprojection"
        r"|\btomorrow\b|\bnext (?:week|month|quarter|year)\b|\bwill (?:it|\w+) (?:go|rise|fall|drop|climb|recover|"
        r"bounce|crash)|\bgood investment\b|\binvest in\b", re.I)),
    ("options and derivatives", re.compile(r"\boptions? (?:chain|price|premium)|\bimplied vol|\bshort interest\b"
                                           r"|\b(?:put|call) options?\b|\bputs? and calls?\b|\bcalls? and puts?\b"
                                           r"|\bstrike price|\bgreeks\b", re.I)),
)


def out_of_scope(question: str) -> str | None:
    """What the question asks for that the lake does not hold (``OUT_OF_SCOPE``), or None."""
    for topic, pattern in OUT_OF_SCOPE:
        if pattern.search(question):
            return topic
    return None
