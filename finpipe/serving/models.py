"""The models a server offers, loaded on demand, and the champion followed as it changes.

Names a client can ask for: ``champion`` (also ``finpipe``): the current champion, whatever its run; ``base``: the
base model; ``<run id>``: any adapter kept in the lake. Models are loaded merged, at the device's inference
precision, and kept (at most ``capacity``, least recently used first out, never the champion). A watcher re-reads
the champion pointer: a new champion is loaded beside the old one and then swapped in, so no request waits for a
load and none is dropped (a request keeps the model it started with). A pointer that breaks (cut off, naming a
folder that is not there, an adapter that does not load) leaves the loaded champion serving and is reported as a
problem (``/health`` and every answer say so) until the pointer is good again.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from finpipe.serving.protocol import ApiError

CHAMPION_ALIASES = ("champion", "finpipe")


@dataclass
class LoadedModel:
    id: str  # run id, or "base"
    label: str
    model: object
    tokenizer: object
    base: dict
    adapter_path: str | None
    loaded_at: float = field(default_factory=time.time)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)


class ModelStore:
    def __init__(self, lake_dir: Path, capacity: int = 2, log=print, decode=None):
        self.lake_dir, self.capacity, self.log = Path(lake_dir), capacity, log
        self.decode = decode  # a DecodeSpec: int8 decode steps on a CPU
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Lock] = {}
        self.champion_id: str | None = None
        self._champion: dict | None = None  # the pointer payload of the champion being served
        self.champion_problem: str | None = None  # why the pointer's champion is not the one served, if it is not
        self._champion_stamp: tuple | None = None
        self._tokenizers: dict[str, object] = {}
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # ------------------------------------------------------------------ names

    def _pointer_stamp(self) -> tuple | None:
        from finpipe.models import registry

        try:
            stat = registry.champion_pointer(self.lake_dir).stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def adapters(self) -> list[str]:
        """Run ids of every adapter kept in the lake."""
        from finpipe.models import registry

        folder = registry.adapters_dir(self.lake_dir)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir()
                      if p.is_dir() and not p.name.startswith((".", "_")) and (p / "adapter_config.json").exists())

    def listing(self) -> list[dict]:
        created = int(time.time())
        out = [{"id": "champion", "object": "model", "created": created, "owned_by": "finpipe",
                "finpipe": {"run_id": self.champion_id}}] if self.champion_id else []
        out.append({"id": "base", "object": "model", "created": created, "owned_by": "finpipe"})
        runs = self.adapters()
        if self.champion_id and self.champion_id not in runs:  # a champion whose folder lives elsewhere
            runs.append(self.champion_id)
        out += [{"id": run, "object": "model", "created": created, "owned_by": "finpipe",
                 "finpipe": {"champion": run == self.champion_id}} for run in runs]
        return out

    def resolve(self, name: str) -> tuple[str, dict, str | None]:
        """(model id, base pointer, adapter folder or None) for a requested model name. ``champion`` is the one being
        served (the watcher's), not whatever the pointer says this instant: a broken pointer never reaches a request."""
        from finpipe.models import registry

        with self._lock:
            champion, problem = self._champion, self.champion_problem
        if name in CHAMPION_ALIASES or (champion and name == champion["run_id"]):
            if champion is None:
                if problem:
                    raise ApiError(503, f"the champion cannot be served: {problem}; ask for model 'base' meanwhile",
                                   type_="server_error", param="model", code="model_unavailable")
                raise ApiError(404, "there is no champion yet: run `finpipe run`, or ask for model 'base'",
                               param="model", code="model_not_found")
            return champion["run_id"], champion["base"], champion["path"]
        if name == "base":
            try:
                base = registry.read_pointer(registry.base_pointer(self.lake_dir), required=registry.BASE_POINTER_FIELDS)
            except FileNotFoundError:
                raise ApiError(404, "no base model in the lake yet: run `finpipe run`", param="model",
                               code="model_not_found") from None
            except ValueError as exc:  # a broken base pointer
                raise ApiError(503, str(exc), type_="server_error", param="model", code="model_unavailable") from None
            return "base", base, None
        if name not in self.adapters():
            known = ", ".join(["champion", "base", *self.adapters()[-5:]])
            raise ApiError(404, f"the model {name!r} does not exist; known: {known}", param="model",
                           code="model_not_found")
        folder = registry.adapters_dir(self.lake_dir) / name
        report = json.loads((folder / "training_report.json").read_text()) \
            if (folder / "training_report.json").exists() else {}
        # the base of that name in *this* lake (the report's absolute path may be another lake's, for a copied or
        # moved lake); else today's base
        name_of_base = Path(report.get("base_model", "")).name
        own = registry.base_pointer(self.lake_dir).parent / name_of_base
        if name_of_base and own.is_dir():
            base = {"name": name_of_base, "path": str(own)}
        else:
            base = registry.read_pointer(registry.base_pointer(self.lake_dir))
        return name, base, str(folder)

    # ------------------------------------------------------------------ loading

    def preflight(self, name: str) -> tuple[tuple[str, dict, str | None], object, int]:
        """(the resolved model, its tokenizer, its context length) without loading its weights: a request is checked
        in full (prompt length included) before any model is loaded or another evicted for it."""
        model_id, base, adapter = target = self.resolve(name)
        with self._lock:
            loaded = self._loaded.get(model_id)
        if loaded is not None:
            return target, loaded.tokenizer, loaded.context_length
        from finpipe.models.safe_loading import load_tokenizer

        self._require_base(base)
        folder = adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else base["path"]
        with self._lock:
            tokenizer = self._tokenizers.get(folder)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(folder)
            except Exception as exc:
                raise self._unavailable(model_id, exc) from exc
            with self._lock:
                self._tokenizers[folder] = tokenizer
        try:
            config = json.loads((Path(base["path"]) / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise self._unavailable(model_id, exc) from exc
        return target, tokenizer, int(config.get("max_position_embeddings") or 2048)

    def get(self, name: str) -> LoadedModel:
        return self.load(*self.resolve(name))

    def load(self, model_id: str, base: dict, adapter: str | None) -> LoadedModel:
        """The model, loaded once however many requests ask for it at once; a load that fails is a 503 naming why."""
        with self._lock:
            if model_id in self._loaded:
                self._loaded.move_to_end(model_id)
                return self._loaded[model_id]
            gate = self._loading.setdefault(model_id, threading.Lock())
        with gate:
            with self._lock:
                if model_id in self._loaded:
                    return self._loaded[model_id]
            try:
                loaded = self._load(model_id, base, adapter)
            except ApiError:
                raise
            except Exception as exc:  # a missing or corrupt adapter: the request gets why, the server keeps going
                raise self._unavailable(model_id, exc) from exc
            with self._lock:
                self._loaded[model_id] = loaded
                while len(self._loaded) > self.capacity:  # never the champion, never the model just loaded
                    evicted = next((k for k in self._loaded if k not in (self.champion_id, model_id)), None)
                    if evicted is None:
                        break
                    del self._loaded[evicted]
                    self.log(f"unloaded {evicted} (keeping {self.capacity} models)")
            return loaded

    @staticmethod
    def _unavailable(model_id: str, exc: Exception) -> ApiError:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return ApiError(503, f"the model {model_id} cannot be loaded: {first}", type_="server_error", param="model",
                        code="model_unavailable")

    @staticmethod
    def _require_base(base: dict) -> None:
        if not Path(base["path"]).is_dir():
            raise ApiError(503, f"the base model folder {base['path']} is missing: run `finpipe run`",
                           type_="server_error", param="model", code="model_unavailable")

    def _load(self, model_id: str, base: dict, adapter: str | None) -> LoadedModel:
        from finpipe.evaluation.generation import load_chat_model
        from finpipe.models.int8_decode import uses_int8_decode

        started = time.perf_counter()
        self._require_base(base)
        model, tokenizer = load_chat_model(base["path"], adapter, merge=adapter is not None, decode=self.decode)
        weights = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.log(f"loaded {model_id} in {time.perf_counter() - started:.1f} s ({weights} weights"
                 + (", int8 decode steps)" if uses_int8_decode(model) else ")"))
        label = f"adapter {model_id} on {base['name']}" if adapter else f"base {base['name']}"
        return LoadedModel(model_id, label, model, tokenizer, base, adapter)

    @property
    def loaded_ids(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    # ------------------------------------------------------------------ health

    def base_problem(self) -> str | None:
        """Why model 'base' cannot be served, or None."""
        from finpipe.models import registry

        try:
            base = registry.read_pointer(registry.base_pointer(self.lake_dir), required=registry.BASE_POINTER_FIELDS)
        except (FileNotFoundError, ValueError) as exc:
            return f"model 'base' cannot be served: {exc}"
        if not Path(base["path"]).is_dir():
            return f"model 'base' cannot be served: its folder {base['path']} is missing"
        return None

    def problems(self) -> list[str]:
        """What the store cannot serve as it should: the champion pointer's trouble, no champion, no base."""
        with self._lock:
            champion_problem, champion = self.champion_problem, self.champion_id
        out = [champion_problem] if champion_problem else []
        if champion is None and not champion_problem:
            out.append("no champion yet: only 'base' and kept runs are served (run `finpipe run`)")
        if base := self.base_problem():
            out.append(base)
        return out

    def can_answer(self) -> bool:
        """Whether any request can be answered by a model: the champion or the base is loaded, or the base can be."""
        with self._lock:
            if (self.champion_id is not None and self.champion_id in self._loaded) or "base" in self._loaded:
                return True
        return self.base_problem() is None

    # ------------------------------------------------------------------ the champion

    def check_champion(self) -> bool:
        """Load a changed champion (beside the current one) and make it current; True when it changed. A pointer that
        cannot be served is recorded as ``champion_problem`` and the current champion kept."""
        from finpipe.models import registry

        stamp = self._pointer_stamp()
        if stamp == self._champion_stamp:
            return False
        pointer = registry.champion_pointer(self.lake_dir)
        keeping = f"; still serving {self.champion_id}" if self.champion_id else ""
        try:
            champion = registry.read_pointer(pointer, required=registry.ADAPTER_POINTER_FIELDS)
        except FileNotFoundError:
            self._champion_stamp = stamp
            return self.note_problem(f"the champion pointer {pointer} is missing{keeping}" if self.champion_id else None)
        except ValueError as exc:  # cut off, not JSON, a field missing: rewritten whole by the next promotion
            self._champion_stamp = stamp
            return self.note_problem(f"{exc}{keeping}")
        if not Path(champion["path"]).is_dir():  # not stamped: looked at again until the folder is there
            return self.note_problem(f"the champion pointer {pointer} names {champion['run_id']} at {champion['path']}, "
                                 f"which does not exist{keeping}")
        self._champion_stamp = stamp
        if champion["run_id"] == self.champion_id:
            return self.note_problem(None)
        try:
            self.load(champion["run_id"], champion["base"], champion["path"])  # before it becomes current
        except ApiError as exc:
            return self.note_problem(f"the champion pointer {pointer} names {champion['run_id']}, which cannot be "
                                 f"loaded ({exc.message}){keeping}")
        with self._lock:
            previous, self.champion_id, self._champion = self.champion_id, champion["run_id"], champion
            self.champion_problem = None
        self.log(f"champion is now {champion['run_id']}" + (f" (was {previous})" if previous else ""))
        return True

    def note_problem(self, problem: str | None) -> bool:
        """Record (or clear) why the pointer's champion is not served; said in the log once per change."""
        with self._lock:
            changed, self.champion_problem = problem != self.champion_problem, problem
        if changed:
            self.log(problem or f"the champion pointer is good again (champion {self.champion_id})")
        return False

    def watch(self, every_s: float = 2.0) -> None:
        def loop():
            while not self._stop.wait(every_s):
                try:
                    self.check_champion()
                except Exception as exc:  # unforeseen: keep serving the current champion, say why
                    self.note_problem(f"champion check failed ({exc!r}); still serving {self.champion_id}")

        self._watcher = threading.Thread(target=loop, name="champion-watcher", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
