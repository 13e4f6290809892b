"""Dagster run-config classes derived from the domain specs: same fields, same defaults, same help
(``finpipe.settings``), so a setting is declared once and the UI's Launchpad shows its description."""

from __future__ import annotations

from typing import Any, Iterable

import dagster as dg
from pydantic import Field, create_model

from finpipe.settings import fields_of


def config_class(spec_cls: type, name: str, only: Iterable[str] | None = None,
                 extra: dict[str, tuple[type, Any]] | None = None, doc: str = "", base: type = dg.Config) -> type:
    """A ``dg.Config`` subclass with ``spec_cls``'s fields (``only``: a subset) plus ``extra`` (name -> (type, Field));
    ``base=dg.ConfigurableResource``: a resource with those fields instead (a setting several assets share)."""
    # float settings refuse NaN and inf already here (the Launchpad, a run config): see finpipe.settings.non_finite
    fields: dict[str, tuple[type, Any]] = {
        field_name: (kind, Field(default=default, description=text, **({"allow_inf_nan": False} if kind is float
                                                                       else {})))
        for field_name, kind, default, text in fields_of(spec_cls, only)
    }
    fields |= extra or {}
    model = create_model(name, __base__=base, __module__=spec_cls.__module__, **fields)
    model.__doc__ = doc or f"The UI/run-config face of ``{spec_cls.__name__}``: same fields, same defaults."
    return model
