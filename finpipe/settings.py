"""One declaration per setting: a domain spec's dataclass field carries its name, default and help, and both
faces of it are derived from there — the Dagster run config (``finpipe.defs.config.config_class``) and the
command-line options (``add_options``). Nothing here imports Dagster.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, Iterable


def setting(default: Any, help: str) -> Any:
    """A spec field with its help text (the UI's description and the ``--help`` line)."""
    return dataclasses.field(default=default, metadata={"help": help})


def help_of(spec_cls: type, name: str) -> str:
    return next(f.metadata.get("help", "") for f in dataclasses.fields(spec_cls) if f.name == name)


def help_with_default(spec_cls: type, name: str, shown: Any = None) -> str:
    """A field's help followed by its default, as a ``--help`` line (a tuple shown as ``2,4``; ``%`` escaped for
    argparse, which formats help with %)."""
    default = getattr(spec_cls, name) if shown is None else shown
    default = ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{help_of(spec_cls, name)} (default: {default})".replace("%", "%%")


def fields_of(spec_cls: type, only: Iterable[str] | None = None) -> list[tuple[str, type, Any, str]]:
    """(name, type, default, help) of each field, in declaration order (``only``: a subset, in its order)."""
    hints = typing.get_type_hints(spec_cls)
    by_name = {f.name: (f.name, hints[f.name], f.default, f.metadata.get("help", "")) for f in dataclasses.fields(spec_cls)}
    return [by_name[n] for n in only] if only is not None else list(by_name.values())


def non_finite(spec: Any) -> list[str]:
    """The float settings of a spec instance that are NaN or infinite, as problems. Range checks such as ``x >= 0``
    let NaN or inf through (every comparison with NaN is false, inf passes any lower bound), and a NaN learning rate
    or budget only shows minutes later, as a NaN loss or a loop that never ends. The specs call this first; the
    run-config face of every spec refuses them too (``finpipe.defs.config.config_class``)."""
    return [f"{f.name} must be a finite number, got {getattr(spec, f.name)}" for f in dataclasses.fields(spec)
            if isinstance(getattr(spec, f.name), float) and not math.isfinite(getattr(spec, f.name))]


def parse_bool(text: str) -> bool:
    """``true``/``false`` as a command line or an environment variable spells it (1/0, yes/no, on/off)."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_options(parser: argparse.ArgumentParser, spec_cls: type, only: Iterable[str] | None = None,
                defaults: dict[str, Any] | None = None) -> None:
    """``--field-name VALUE`` for each field (default None: unset options leave the spec's default in place)."""
    for name, kind, default, _help in fields_of(spec_cls, only):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=parse_bool if kind is bool else kind,
                            default=None, metavar=kind.__name__.upper(),
                            help=help_with_default(spec_cls, name, (defaults or {}).get(name, default)))


def chosen(args: argparse.Namespace, spec_cls: type, only: Iterable[str] | None = None) -> dict[str, Any]:
    """The options given on the command line, as spec keyword arguments."""
    return {name: getattr(args, name) for name, *_ in fields_of(spec_cls, only) if getattr(args, name, None) is not None}
