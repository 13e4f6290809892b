"""`finpipe ask`, `chat`, `demo` and `evaluate`: questions answered through the one answering path
(``finpipe.inference.answering``), by the champion merged once, or by a running `finpipe serve`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finpipe import paths


def _sampling(args: argparse.Namespace):
    """Validated before anything is loaded, so a bad value costs nothing but a one-line error."""
    from finpipe.evaluation.generation import Sampling

    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty)


def _resolve_model(which: str) -> tuple[str, Path, Path | None]:
    """(label, base folder, adapter folder or None) for ``--adapter``.

    With an adapter, the base is the one it was trained on (recorded in its pointer), not today's base.
    """
    from finpipe.models import registry

    lake_dir = paths.lake_dir()
    pointer = registry.base_pointer(lake_dir)
    # "none" and an adapter folder take the base from its pointer: say what to run when it is missing
    if which not in ("champion", "latest") and not pointer.exists() and (
            which == "none" or (Path(which).expanduser() / "adapter_config.json").exists()):
        raise FileNotFoundError(f"no base model yet ({pointer} is missing): run `finpipe run` first")
    payload = registry.resolve_adapter(lake_dir, which)
    if payload is None:
        base = registry.read_pointer(pointer, required=registry.BASE_POINTER_FIELDS)
        label, base_dir, adapter_dir = f"base {base['name']}", Path(base["path"]), None
    else:
        base = payload["base"]
        label = f"{which if which in ('champion', 'latest') else 'adapter'} {payload['run_id']}"
        base_dir, adapter_dir = Path(base["path"]), Path(payload["path"])
        if not adapter_dir.is_dir():
            raise FileNotFoundError(f"adapter folder {adapter_dir} (run {payload['run_id']}) no longer exists")
    if not base_dir.is_dir():
        raise FileNotFoundError(f"base model folder {base_dir} ({base['name']}) no longer exists: run `finpipe run`")
    return label, base_dir, adapter_dir


def _facts():
    from finpipe.inference.context import LakeFacts
    from finpipe.market.lake import PriceLake

    return LakeFacts(PriceLake(paths.lake_db_path()))


def _quiet_transformers() -> None:
    """No weight-loading progress bars or library deprecation warnings between a question and its answer."""
    from transformers.utils import logging as hf_logging

    from finpipe.runtime import quiet_library_deprecations

    hf_logging.disable_progress_bar()
    quiet_library_deprecations()


def _answer_spec(args: argparse.Namespace):
    """The ``--decode-weights`` and ``--on-unverified`` choices, validated before anything is loaded."""
    from finpipe.inference.answering import AnswerSpec
    from finpipe.settings import chosen

    return AnswerSpec(**chosen(args, AnswerSpec))


class TransformersChat:
    """A transformers model and tokenizer behind the interface ``LeanChatModel`` has (``finpipe.inference.lean``):
    what ``ask`` and ``chat`` use for models the lean decoder does not mirror, on CUDA, and without a merge."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.weights = str(next(model.parameters()).dtype).removeprefix("torch.")

    def prompt(self, messages) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompt_tokens(self, messages) -> int:
        return len(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])

    def generate(self, messages, sampling):
        from finpipe.evaluation.generation import generate

        return generate(self.model, self.tokenizer, messages, sampling)


def _log(line: str) -> None:
    print(f"finpipe: {line}", file=sys.stderr)


def _merged_champion(base_dir: Path, adapter_dir: Path) -> Path:
    """The adapter merged into its base, from the cache when its stamp matches (no precision measured, nothing
    merged), else merged now once at this machine's inference precision."""
    from finpipe.models import merged

    folder = merged.cached_any(paths.lake_dir(), adapter_dir.name, base_dir, adapter_dir)
    if folder is None:
        from finpipe.runtime import accelerator, inference_dtype

        dtype = str(inference_dtype(accelerator())).removeprefix("torch.")
        folder = merged.build(paths.lake_dir(), adapter_dir.name, base_dir, adapter_dir, dtype, log=_log)
    return folder


def _load(choice: tuple[str, Path, Path | None], decode=None):
    """(label, chat model) for a ``_resolve_model`` choice, the adapter merged (once, cached). On a CPU, a model the
    lean decoder mirrors (``finpipe.inference.lean``: Llama family) is decoded without transformers; otherwise
    transformers. ``decode``: a ``DecodeSpec`` (int8 decode steps)."""
    import torch

    label, base_dir, adapter_dir = choice
    folder = _merged_champion(base_dir, adapter_dir) if adapter_dir is not None else base_dir
    where = f"merged: {folder}" if adapter_dir is not None else str(folder)
    cpu = not torch.cuda.is_available()
    from finpipe.inference import lean

    why_not = lean.supports(folder) if cpu else "CUDA: transformers' kernels"
    if why_not is None:
        from finpipe.runtime import claim_cpu_share

        claim_cpu_share()
        int8 = decode is not None and decode.int8_on("cpu")
        chat = lean.LeanChatModel(folder, int8=int8)
        _log(f"loading {label} ({where}): {chat.weights} weights{', int8 decode steps' if chat.model.int8 else ''}"
             + (f"; no drafts ({chat.no_drafts})" if chat.no_drafts else ""))
        return label, chat
    from finpipe.evaluation.generation import load_chat_model
    from finpipe.models.int8_decode import uses_int8_decode

    _quiet_transformers()
    model, tokenizer = load_chat_model(folder, None, decode=decode)
    chat = TransformersChat(model, tokenizer)
    _log(f"loading {label} ({where}; transformers: {why_not}): {chat.weights} weights"
         + (", int8 decode steps" if uses_int8_decode(model) else ""))
    return label, chat


def _load_for_demo(choice: tuple[str, Path, Path | None]):
    """(label, model, tokenizer) with the adapter unmerged: the demo switches it off to show the base model."""
    from finpipe.evaluation.generation import load_chat_model

    _quiet_transformers()
    label, base_dir, adapter_dir = choice
    _log(f"loading {label} ({base_dir}{' + ' + str(adapter_dir) if adapter_dir else ''})")
    model, tokenizer = load_chat_model(base_dir, adapter_dir, merge=False)
    return label, model, tokenizer


def _in_context(prepared, chat, sampling) -> int:
    """The prompt's token count, after checking that it and the answer fit the model's context."""
    prompt_tokens = chat.prompt_tokens(prepared.messages)
    if prompt_tokens + sampling.max_new_tokens > chat.context:
        raise ValueError(f"the question is too long: {prompt_tokens} prompt tokens + {sampling.max_new_tokens} "
                         f"answer tokens exceed the model's context of {chat.context}")
    return prompt_tokens


def _answer(prepared, chat, sampling, label: str, show_prompt: bool, spec):
    """Generate and verify through the answering path (``finpipe.inference.answering``), print: the answer on
    stdout (pipeable); notes, and the verdict with the data's date and the speed in one line, on stderr. A refused
    question prints its refusal on stderr without calling the model; returns None then, else the ``Answer``."""
    from finpipe.inference.answering import answer

    if prepared.refusal is not None:
        print(f"finpipe: {prepared.refusal}", file=sys.stderr)
        return None
    for note in prepared.grounding.notes:
        print(f"finpipe: {note}", file=sys.stderr)
    _in_context(prepared, chat, sampling)
    if show_prompt:
        print("--- prompt ---")
        print(chat.prompt(prepared.messages), end="")
        print("\n--- answer ---")
    result = answer(prepared, chat.generate, sampling, spec.on_unverified)
    print(result.text)
    out = result.generated
    tries = f", {result.attempts} attempts" if result.attempts > 1 else ""
    print(f"finpipe: {result.status_line()} [{label}: {out.new_tokens} tokens in {out.seconds:.1f} s, "
          f"{out.tokens_per_s:.1f} tokens/s{tries}]", file=sys.stderr)
    return result


def _running_server(args: argparse.Namespace, spec) -> str | None:
    """The URL of a `finpipe serve` that answers exactly as this `ask` would: same lake, same champion, same
    policy (its /health says so), or None. Standard library only: nothing heavy is imported to find out."""
    import json
    import urllib.request

    if args.server == "off" or args.adapter != "champion" or args.show_prompt or args.repetition_penalty != 1.0 \
            or args.allow_ungrounded:
        return None
    url = "http://127.0.0.1:8000" if args.server == "auto" else args.server.rstrip("/")
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=0.5) as reply:
            health = json.loads(reply.read())
        from finpipe.models import registry

        champion = registry.read_pointer(registry.champion_pointer(paths.lake_dir()))["run_id"]
    except (OSError, ValueError, KeyError):
        return None
    # llama.cpp answers from the q8_0 export: its text can differ from this process's, so only a URL asked for
    torch_or_asked = health.get("engine", "torch") == "torch" or args.server != "auto"
    same = (torch_or_asked and health.get("status") == "ok" and health.get("lake") == str(paths.lake_dir().resolve())
            and health.get("champion") == champion and health.get("on_unverified") == spec.on_unverified
            and (args.decode_weights is None or health.get("decode_weights") == spec.decode_weights))
    return url if same else None


def _ask_server(url: str, question: str, sampling) -> int | None:
    """Send the question to a running server; print as an in-process answer prints. None: it could not be reached."""
    import json
    import time
    import urllib.error
    import urllib.request

    body = {"model": "champion", "messages": [{"role": "user", "content": question}],
            "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            answer = json.loads(reply.read())
    except urllib.error.HTTPError as exc:  # the server's own one-line error (a refusal is a 200)
        try:
            message = json.loads(exc.read()).get("error", {}).get("message", str(exc))
        except ValueError:
            message = f"the server at {url} answered {exc.code}"
        raise ValueError(message) from None
    except (urllib.error.URLError, OSError):  # it went away between /health and the question: answer here
        return None
    finpipe, text = answer.get("finpipe", {}), answer["choices"][0]["message"]["content"]
    if finpipe.get("verdict") == "refused":
        raise ValueError(text)
    print(text)
    print(f"finpipe: {finpipe.get('status_line', finpipe.get('verdict'))} [answered by the server at {url}: "
          f"{answer['usage']['completion_tokens']} tokens in {time.perf_counter() - started:.1f} s]", file=sys.stderr)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    """Answer one question, grounded in the lake's latest facts for the tickers it names, and verified."""
    from finpipe.inference.answering import prepare

    sampling, spec = _sampling(args), _answer_spec(args)
    if url := _running_server(args, spec):  # a server already holds the model: no load at all
        answered = _ask_server(url, args.question, sampling)
        if answered is not None:
            return answered
        print(f"finpipe: the server at {url} stopped answering: answering here", file=sys.stderr)
    import time

    from finpipe.cli import STARTED

    marks = [("start-up", time.perf_counter())]  # python, finpipe's imports, the argument checks
    choice = _resolve_model(args.adapter)  # cheap checks first: pointers, lake, then the model
    facts = _facts()
    facts.tickers()
    prepared = prepare(args.question, facts, args.allow_ungrounded)  # refused before the model loads
    if prepared.refusal is not None:
        raise ValueError(prepared.refusal)
    marks.append(("lake and grounding", time.perf_counter()))
    import torch  # noqa: F401 (timed on its own: the largest import left)

    marks.append(("torch import", time.perf_counter()))
    label, chat = _load(choice, decode=spec)
    marks.append(("weights", time.perf_counter()))
    result = _answer(prepared, chat, sampling, label, args.show_prompt, spec)
    if args.timings:
        _print_timings(STARTED, marks, result.generated if result else None)
    args.exit_at_once = True  # nothing left to do: the console entry skips tearing torch down
    return 0


def _print_timings(started: float, marks: list[tuple[str, float]], generated) -> None:
    import time

    parts, previous = [], started
    for name, at in marks:
        parts.append(f"{name} {at - previous:.2f} s")
        previous = at
    if generated is not None and generated.prefill_s is not None:
        parts += [f"prefill {generated.prefill_s:.2f} s", f"decode {generated.seconds - generated.prefill_s:.2f} s "
                  f"({generated.new_tokens} tokens)"]
    elif generated is not None:
        parts.append(f"generation {generated.seconds:.2f} s ({generated.new_tokens} tokens)")
    print(f"finpipe: timings: {', '.join(parts)}; {time.perf_counter() - started:.2f} s since finpipe started",
          file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    """Answer questions read line by line from stdin until EOF, `exit` or `quit` (model loaded once)."""
    from finpipe.inference.answering import prepare

    sampling, spec = _sampling(args), _answer_spec(args)
    choice = _resolve_model(args.adapter)
    facts = _facts()
    known = facts.tickers()
    label, chat = _load(choice, decode=spec)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"finpipe chat with {label}; tickers: {', '.join(known)}. `exit` or Ctrl-D ends.")
    try:
        while True:
            if interactive:
                try:
                    line = input("you> ")
                except EOFError:
                    print()
                    break
            else:
                line = sys.stdin.readline()
                if not line:
                    break
            question = line.strip()
            if question.lower() in ("exit", "quit"):
                break
            if not question:
                continue
            try:
                _answer(prepare(question, facts, args.allow_ungrounded), chat, sampling, label, args.show_prompt,
                        spec)
            except ValueError as exc:  # one bad question does not end the chat
                print(f"finpipe: {exc}", file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C ends the chat, not with a traceback
        print()
    return 0


def _columns(left: str, right: str, width: int) -> str:
    """Two texts side by side, each wrapped to half of ``width``."""
    import itertools
    import textwrap

    col = max(20, (width - 3) // 2)
    a, b = (textwrap.wrap(text, col) or [""] for text in (left, right))
    return "\n".join(f"{x:<{col}} | {y}" for x, y in itertools.zip_longest(a, b, fillvalue=""))


def cmd_demo(args: argparse.Namespace) -> int:
    """Preset questions, one per family: the base model's answer next to the adapter's, with the facts."""
    import shutil

    from finpipe.evaluation.generation import generate
    from finpipe.inference.answering import answer, prepare
    from finpipe.inference.context import demo_questions

    if args.adapter == "none":
        raise ValueError("demo compares the base model with an adapter: --adapter none leaves nothing to compare")
    sampling = _sampling(args)
    choice = _resolve_model(args.adapter)
    facts = _facts()
    questions = demo_questions(facts.tickers())
    label, model, tokenizer = _load_for_demo(choice)  # disable_adapter() gives the base model
    width = min(shutil.get_terminal_size((120, 24)).columns, 160)

    def with_base(messages, s):
        with model.disable_adapter():  # the same weights without the adapter: the base model
            return generate(model, tokenizer, messages, s)

    for i, (family, question) in enumerate(questions, 1):
        prepared = prepare(question, facts)
        tuned = answer(prepared, lambda messages, s: generate(model, tokenizer, messages, s), sampling)
        base = answer(prepared, with_base, sampling)
        grounding = prepared.grounding
        print("=" * width)
        print(f"[{i}/{len(questions)}] {family}: {', '.join(grounding.tickers)} as of {grounding.as_of}")
        print(f"Q: {question}")
        print(f"reference: {grounding.reference or '(no reference)'}")
        print("-" * width)
        print(_columns("base model", label, width))
        print(_columns(base.text or "(empty)", tuned.text or "(empty)", width))
        print(_columns(f"[{base.status_line()}]", f"[{tuned.status_line()}]", width))
    print("reference = the rule-based answer from the lake's facts (what the training samples teach)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a model on the lake's golden set twice: with each sample's ideal context, and end to end (the question
    alone through the answering path `ask` and `serve` use), plus the wild part; print the parts side by side."""
    import json

    from finpipe.evaluation.end_to_end import E2E_METRICS, UNANSWERABLE, UNANSWERABLE_METRICS, build_set
    from finpipe.evaluation.evaluate import HEADLINE_METRICS, EvalSpec, evaluate_model
    from finpipe.instructions.samples import read_jsonl
    from finpipe.market.lake import PriceLake

    choice = _resolve_model(args.adapter)
    golden_file = paths.DatasetFiles.of(paths.lake_dir()).golden
    if not golden_file.exists():
        raise FileNotFoundError(f"no golden set at {golden_file}: run `finpipe run` first")
    golden = read_jsonl(golden_file)
    questions = build_set(golden, PriceLake(paths.lake_db_path()))
    label, base_dir, adapter_dir = choice
    _quiet_transformers()
    scores = evaluate_model(label, str(base_dir), str(adapter_dir) if adapter_dir else None, [], golden, EvalSpec(),
                            log=lambda line: print(f"finpipe: {line}", file=sys.stderr), with_val=False,
                            with_forgetting=False, end_to_end=questions, retry=args.on_unverified == "retry")
    shown = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    ideal = scores.golden.overall
    print(f"{label}: golden set, ideal context (n={len(golden)}): "
          + ", ".join(f"{k} {shown(ideal.get(k))}" for k in HEADLINE_METRICS))
    summary = scores.end_to_end["summary"]
    for part, got in summary["parts"].items():
        metrics = UNANSWERABLE_METRICS if part == UNANSWERABLE else E2E_METRICS
        print(f"{label}: end to end, {part} (n={got['n']}): " + ", ".join(
            f"{k} {shown(got['means'].get(k))} [{', '.join(shown(x) for x in got['ci'].get(k) or [])}]"
            for k in metrics))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": label, "golden": scores.golden.as_dict()
                                               | {"rows": scores.golden.rows}, "end_to_end": scores.end_to_end},
                                              indent=1))
        print(f"answers and scores: {args.json}")
    return 0


def _inference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default="champion",
                        help="champion (default), latest, none (base model only) or an adapter folder")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1 = none")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="answer length limit")
    parser.add_argument("--allow-ungrounded", action="store_true",
                        help="answer questions that name no ticker of the lake (no market data) instead of refusing")
