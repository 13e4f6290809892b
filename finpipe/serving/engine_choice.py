"""Which engine runs the champion: PyTorch, or llama.cpp on the champion's GGUF export.

- ``torch``: the merged model in PyTorch (int8 decode steps on a CPU), as before.
- ``llama.cpp``: the champion's recorded GGUF export (``finpipe export --gguf DIR`` records it in the lake), or the
  file ``--gguf PATH`` names; without llama-cpp-python or without an export the server refuses to start, naming
  what to do, and a new champion without an export keeps the previous one serving (``/health`` says why) until its
  export is recorded.
- ``auto`` (the default): llama.cpp when llama-cpp-python is importable and the champion has an export, else PyTorch;
  a new champion without an export is served on PyTorch (``/health``'s ``engine_note`` says why).

Only the champion runs on llama.cpp: ``base`` and other runs have no export and run on PyTorch.
"""

from __future__ import annotations

from pathlib import Path

ENGINES = ("auto", "torch", "llama.cpp")


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return engine


def champion_candidates(lake_dir: Path, engine: str, gguf: str | None, run_id: str) -> tuple[list, str | None]:
    """(what to try to load the champion ``run_id`` on, in order: GgufRecords, None for PyTorch; why it is not
    llama.cpp where ``auto`` would have chosen it, or None). ``--engine llama.cpp`` (or ``--gguf``) without llama-cpp-
    python or a usable file raises, with the message a person needs."""
    from finpipe.inference.exported import given_gguf, recorded_export
    from finpipe.serving import gguf_engine

    if engine == "torch":
        return [None], None
    if engine == "auto" and not gguf:
        if not gguf_engine.available():
            return [None], None  # the plain default without the optional package: nothing to say
        try:
            record = recorded_export(lake_dir, run_id)
        except (ValueError, FileNotFoundError) as exc:
            return [None], f"{exc}; running the champion on PyTorch"
        if record is None:
            return [None], (f"the champion {run_id} has no GGUF export: running it on PyTorch (`finpipe export "
                            "--gguf DIR` makes one, and this server then switches to llama.cpp)")
        return [record, None], None
    if not gguf_engine.available():
        raise ImportError(f"llama-cpp-python is not installed: {gguf_engine.INSTALL_HINT}")
    if gguf:
        try:
            return [given_gguf(Path(gguf), lake_dir, run_id)], None
        except ValueError:  # another run's file: the champion changed since the start; its own export, if any
            record = recorded_export(lake_dir, run_id)
            if record is None:
                raise
            return [record], None
    record = recorded_export(lake_dir, run_id)
    if record is None:
        raise FileNotFoundError(f"the champion {run_id} has no GGUF export: run `finpipe export --gguf DIR` first (or "
                                "serve with --engine torch)")
    return [record], None
