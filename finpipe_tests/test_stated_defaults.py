"""What the docs, the README and ``--help`` say a default is, against the default the code really uses. Each setting
is declared once (a spec field); these are the places that still repeat a default in words, and they drifted before
(the docs gave ``eval_points`` as 3 while the spec said 2)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re

import pytest

from finpipe.paths import REPO_ROOT

#: every module that declares settings with ``finpipe.settings.setting``
SPEC_MODULES = ("finpipe.evaluation.generation", "finpipe.evaluation.evaluate", "finpipe.training.spec",
                "finpipe.instructions.split", "finpipe.instructions.builder", "finpipe.inference.answering",
                "finpipe.studies.compression", "finpipe.studies.peft_study", "finpipe.models.scratch",
                "finpipe.serving.app", "finpipe.tracking")
#: how prose states a default: "`eval_points`, 2 by default", "`max_minutes` (2.5 by default", "`x` (default: 3"
STATED = (re.compile(r"`(?P<name>[a-z_]+)`(?:,| \()\s*(?P<value>[\w.]+)(?: [a-z ]{0,24})? by default"),
          re.compile(r"`(?P<name>[a-z_]+)` \(default:? (?P<value>[\w.]+)"))
WORDS = {"half": 0.5, "on": True, "off": False, "true": True, "false": False, "none": None}


def _settings() -> dict[str, set]:
    """setting name -> the defaults it has (the same name in two specs may differ)."""
    found: dict[str, set] = {}
    for module_name in SPEC_MODULES:
        module = importlib.import_module(module_name)
        for obj in vars(module).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module_name:
                for field in dataclasses.fields(obj):
                    if "help" in field.metadata:
                        found.setdefault(field.name, set()).add(field.default if not isinstance(field.default, list)
                                                                else tuple(field.default))
    return found


def _value(text: str):
    text = text.lower().rstrip(".")
    if text in WORDS:
        return WORDS[text]
    try:
        return float(text)
    except ValueError:
        return text


def _same(stated, default) -> bool:
    if isinstance(stated, float) and isinstance(default, (int, float)) and not isinstance(default, bool):
        return abs(stated - default) < 1e-12
    return stated == default or str(stated) == str(default).lower()


def test_prose_states_the_defaults_the_specs_use():
    settings = _settings()
    assert {"eval_points", "max_minutes", "general_replay_share", "batch_size"} <= set(settings)
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    checked, wrong = 0, []
    for page in pages:
        for pattern in STATED:
            for match in pattern.finditer(page.read_text()):
                name, stated = match["name"], _value(match["value"])
                if name not in settings:
                    continue
                checked += 1
                if not any(_same(stated, default) for default in settings[name]):
                    wrong.append(f"{page.name}: `{name}` stated {match['value']!r}, the spec says "
                                 f"{sorted(map(str, settings[name]))}")
    assert not wrong, "\n".join(wrong)
    assert checked >= 3  # the pages do state defaults: a pattern that matches nothing would pass anything


def _actions(parser: argparse.ArgumentParser, path: str = "finpipe"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif action.option_strings and action.help:
            yield path, action


#: how --help states a default: "(default: 2)", "0 = greedy decoding (default)", "champion (default), latest ...",
#: "auto (http://127.0.0.1:8000, default)"
HELP_FORMS = (re.compile(r"\(default: ([^)]+)\)"), re.compile(r"(\S+) = [^(,]*\(default\)"),
              re.compile(r"(\S+) \([^()]*\bdefault\)"))
#: defaults whose meaning --help states in words rather than as the value itself
MEANT = {"--parity-samples": {0: "all"}}


def test_help_states_the_defaults_the_options_use():
    from finpipe.cli import build_parser

    checked, wrong = 0, []
    for path, action in _actions(build_parser()):
        text = " ".join(action.help.replace("%%", "%").split())
        stated = next((m for form in HELP_FORMS if (m := form.search(text))), None)
        if not stated or action.default in (None, argparse.SUPPRESS):
            continue
        checked += 1
        expected = MEANT.get(action.option_strings[-1], {}).get(action.default, action.default)
        shown = ",".join(map(str, expected)) if isinstance(expected, (tuple, list)) else expected
        said = stated[1].strip()
        if not (_same(_value(said), shown) or said.startswith(f"{shown} ") or said == str(shown)):
            wrong.append(f"{path} {action.option_strings[-1]}: help says {said!r}, the default is {shown!r}")
    assert not wrong, "\n".join(wrong)
    assert checked >= 10  # the options that state a default in words (the spec-derived ones are built from it)


@pytest.mark.parametrize("years", [13])
def test_run_help_states_the_history_it_ingests(years, capsys):
    from finpipe.cli import build_parser
    from finpipe.cli.run import DEFAULT_HISTORY_DAYS

    assert DEFAULT_HISTORY_DAYS // 365 == years
    run = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    start = next(a for a in run._actions if "--start" in a.option_strings)
    assert f"END - {years} years" in start.help
