"""The models a server offers, loaded on demand, and the champion followed as it changes.

Names a client can ask for: ``champion`` (also ``finpipe``): the current champion, whatever its run; ``base``: the
base model; ``<run id>``: any adapter kept in the lake. Models are loaded merged, at the device's inference
precision, and kept (at most ``capacity``, least recently used first out). A watcher re-reads the champion
pointer: a new champion is loaded beside the old one and then swapped in, so no request waits for a load and none
is dropped (a request keeps the model it started with).
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
        self._champion_stamp: tuple | None = None
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

    def read_champion(self) -> dict | None:
        from finpipe.models import registry

        pointer = registry.champion_pointer(self.lake_dir)
        try:
            return registry.read_pointer(pointer)
        except (FileNotFoundError, ValueError, KeyError):
            return None

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
        """(model id, base pointer, adapter folder or None) for a requested model name."""
        from finpipe.models import registry

        champion = self.read_champion()
        if name in CHAMPION_ALIASES or (champion and name == champion["run_id"]):
            if champion is None:
                raise ApiError(404, "there is no champion yet: run `finpipe run`, or ask for model 'base'",
                               param="model", code="model_not_found")
            return champion["run_id"], champion["base"], champion["path"]
        if name == "base":
            try:
                base = registry.read_pointer(registry.base_pointer(self.lake_dir))
            except FileNotFoundError:
                raise ApiError(404, "no base model in the lake yet: run `finpipe run`", param="model",
                               code="model_not_found") from None
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

    def get(self, name: str) -> LoadedModel:
        model_id, base, adapter = self.resolve(name)
        with self._lock:
            if model_id in self._loaded:
                self._loaded.move_to_end(model_id)
                return self._loaded[model_id]
            gate = self._loading.setdefault(model_id, threading.Lock())
        with gate:  # one load per model, however many requests ask for it at once
            with self._lock:
                if model_id in self._loaded:
                    return self._loaded[model_id]
            loaded = self._load(model_id, base, adapter)
            with self._lock:
                self._loaded[model_id] = loaded
                while len(self._loaded) > self.capacity:
                    evicted, _ = self._loaded.popitem(last=False)
                    self.log(f"unloaded {evicted} (keeping {self.capacity} models)")
            return loaded

    def _load(self, model_id: str, base: dict, adapter: str | None) -> LoadedModel:
        from finpipe.evaluation.generation import load_chat_model

        started = time.perf_counter()
        if not Path(base["path"]).is_dir():
            raise ApiError(503, f"the base model folder {base['path']} is missing: run `finpipe run`",
                           type_="server_error", code="model_unavailable")
        from finpipe.models.int8_decode import uses_int8_decode

        model, tokenizer = load_chat_model(base["path"], adapter, merge=adapter is not None, decode=self.decode)
        weights = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.log(f"loaded {model_id} in {time.perf_counter() - started:.1f} s ({weights} weights"
                 + (", int8 decode steps)" if uses_int8_decode(model) else ")"))
        label = f"adapter {model_id} on {base['name']}" if adapter else f"base {base['name']}"
        return LoadedModel(model_id, label, model, tokenizer, base, adapter)

    # ------------------------------------------------------------------ the champion

    def check_champion(self) -> bool:
        """Load a changed champion (beside the current one) and make it current; True when it changed."""
        stamp = self._pointer_stamp()
        if stamp == self._champion_stamp:
            return False
        champion = self.read_champion()
        self._champion_stamp = stamp
        if champion is None or champion["run_id"] == self.champion_id:
            return False
        self.get("champion")  # loads the new champion's weights before it becomes current
        previous, self.champion_id = self.champion_id, champion["run_id"]
        self.log(f"champion is now {champion['run_id']}" + (f" (was {previous})" if previous else ""))
        return True

    def watch(self, every_s: float = 2.0) -> None:
        def loop():
            while not self._stop.wait(every_s):
                try:
                    self.check_champion()
                except Exception as exc:  # a broken pointer mid-write: keep serving the current champion
                    self.log(f"champion check failed, keeping {self.champion_id}: {exc}")

        self._watcher = threading.Thread(target=loop, name="champion-watcher", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
