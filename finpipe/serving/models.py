"""The models a server offers, loaded on demand, and the champion followed as it changes.

Names a client can ask for: ``champion`` (also ``finpipe``): the current champion, whatever its run; ``base``: the
base model; ``<run id>``: any adapter kept in the lake. Models are loaded merged, at the device's inference
precision, and kept (at most ``capacity``, least recently used first out, never the champion). A watcher re-reads
the champion pointer: a new champion is loaded beside the old one and then swapped in, so no request waits for a
load and none is dropped (a request keeps the model it started with). A pointer that breaks (cut off, naming a
folder that is not there, an adapter that does not load) leaves the loaded champion serving and is reported as a
problem (``/health`` and every answer say so) until the pointer is good again.

The champion runs on an engine (``finpipe.serving.engine_choice``): PyTorch, or llama.cpp on its recorded GGUF export
(``finpipe.inference.exported``; the file's SHA-256 is checked before it loads). Other models always run on PyTorch,
at the precision decided once per server (``torch_dtype``), never measured again on a reload.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from finpipe.serving.engine_choice import champion_candidates, check_engine
from finpipe.serving.protocol import ApiError

CHAMPION_ALIASES = ("champion", "finpipe")


@dataclass
class LoadedModel:
    id: str  # run id, or "base"
    label: str
    model: object  # a transformers model, or a gguf_engine.GgufModel
    tokenizer: object
    base: dict
    adapter_path: str | None
    loaded_at: float = field(default_factory=time.time)
    engine: str = "torch"  # or "llama.cpp"
    precision: str = ""  # "bfloat16, int8 decode steps", "q8_0", ...
    gguf: object | None = None  # the GgufRecord it runs
    decoder: str = "transformers"  # on PyTorch: "lean" (finpipe.inference.lean, a merged folder) or "transformers"

    @property
    def context_length(self) -> int:
        if self.engine == "llama.cpp":
            return self.model.n_ctx
        if self.decoder == "lean":
            return self.model.context
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)


def _key(model_id: str, gguf) -> str:
    """A loaded model's key: the same run on llama.cpp and on PyTorch are two models."""
    return model_id if gguf is None else f"{model_id}@{gguf.path}"


class ModelStore:
    def __init__(self, lake_dir: Path, capacity: int = 2, log=print, decode=None, engine: str = "torch",
                 gguf: str | None = None, compute=None):
        self.lake_dir, self.capacity, self.log = Path(lake_dir), capacity, log
        # runs a load (or the precision measurement) where the models compute: the server passes the generation
        # thread's ``Engine.call`` (see there why); called directly otherwise
        self.compute = compute or (lambda fn: fn())
        self.decode = decode  # a DecodeSpec: int8 decode steps on a CPU
        self.engine = check_engine(engine)  # how the champion runs: auto, torch or llama.cpp
        self.gguf = gguf  # a GGUF file given by hand for the champion (serve --gguf)
        self.engine_note: str | None = None  # why the champion does not run on llama.cpp, where auto would have it
        self._champion_gguf = None  # the GgufRecord the champion runs on, None: PyTorch
        self._dtype = None  # PyTorch's precision, decided once (torch_dtype)
        self._deciding = threading.Lock()
        self.bf16_speedup: float | None = None
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
        from finpipe.inference.exported import exports_dir
        from finpipe.models import registry

        try:
            stat = registry.champion_pointer(self.lake_dir).stat()
        except OSError:
            return None
        try:  # an export recorded (or replaced) for the champion is a change to act on too
            exports = exports_dir(self.lake_dir).stat().st_mtime_ns
        except OSError:
            exports = None
        return stat.st_mtime_ns, stat.st_size, exports

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

    def target(self, name: str) -> tuple[str, dict, str | None, object | None]:
        """``resolve``'s (model id, base, adapter) and the GgufRecord the model runs on (the champion's on llama.cpp;
        None: PyTorch), read together: a champion swapped in between never pairs one run with another's file."""
        with self._lock:
            model_id, base, adapter = self.resolve(name)
            return model_id, base, adapter, (self._champion_gguf if model_id == self.champion_id else None)

    def preflight(self, name: str) -> tuple[tuple[str, dict, str | None, object | None], object, int]:
        """(the resolved model, its tokenizer, its context length) without loading its weights: a request is checked
        in full (prompt length included) before any model is loaded or another evicted for it."""
        model_id, base, adapter, gguf = target = self.target(name)
        with self._lock:
            loaded = self._loaded.get(_key(model_id, gguf))
        if loaded is not None:
            return target, loaded.tokenizer, loaded.context_length
        self._require_base(base)
        tokenizer = self._tokenizer(model_id, base, adapter)
        try:
            config = json.loads((Path(base["path"]) / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise self._unavailable(model_id, exc) from exc
        return target, tokenizer, int(config.get("max_position_embeddings") or 2048)

    def _tokenizer(self, model_id: str, base: dict, adapter: str | None):
        """finpipe's tokenizer of the model (the adapter's own, else the base's), loaded once per folder."""
        from finpipe.models.safe_loading import load_tokenizer

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
        return tokenizer

    def get(self, name: str) -> LoadedModel:
        return self.load(*self.target(name))

    def load(self, model_id: str, base: dict, adapter: str | None, gguf=None) -> LoadedModel:
        """The model, loaded once however many requests ask for it at once; a load that fails is a 503 naming why."""
        key = _key(model_id, gguf)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._loaded:
                    return self._loaded[key]
            try:
                loaded = self.compute(lambda: self._load_gguf(model_id, base, adapter, gguf) if gguf is not None
                                      else self._load(model_id, base, adapter))
            except ApiError:
                raise
            except Exception as exc:  # a missing or corrupt adapter: the request gets why, the server keeps going
                raise self._unavailable(model_id, exc) from exc
            with self._lock:
                self._loaded[key] = loaded
                champion = _key(self.champion_id, self._champion_gguf) if self.champion_id else None
                while len(self._loaded) > self.capacity:  # never the champion, never the model just loaded
                    evicted = next((k for k in self._loaded if k not in (champion, key)), None)
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

    def torch_dtype(self):
        """PyTorch's precision for every model this server loads, decided once (the first time it is needed: at the
        start when the champion runs on PyTorch): ``runtime.inference_dtype`` measures whether bf16 pays on this CPU,
        and a measurement taken later, under load, could decide otherwise for a reloaded champion."""
        if self._dtype is None:
            self.compute(self._decide_dtype)  # never waited for under the lock: the decision may run on another thread
        return self._dtype

    def _decide_dtype(self) -> None:
        import os

        from finpipe import runtime

        with self._deciding:
            if self._dtype is None:
                device = runtime.accelerator()
                self._dtype = runtime.inference_dtype(device)
                if device == "cpu" and runtime.cpu_supports_bf16() and os.environ.get("FINPIPE_CPU_BF16") not in ("0", "1"):
                    self.bf16_speedup = runtime.cpu_bf16_speedup()

    def precision_line(self) -> str | None:
        """The PyTorch precision decision in words, None before it is made."""
        if self._dtype is None:
            return None
        said = str(self._dtype).removeprefix("torch.")
        if self.bf16_speedup is not None:
            said += f" (bf16 measured {self.bf16_speedup:.2f}x fp32 at the start)"
        return said

    def _load(self, model_id: str, base: dict, adapter: str | None) -> LoadedModel:
        from finpipe.evaluation.generation import load_chat_model
        from finpipe.models.int8_decode import uses_int8_decode

        started = time.perf_counter()
        self._require_base(base)
        label = f"adapter {model_id} on {base['name']}" if adapter else f"base {base['name']}"
        dtype = self.torch_dtype()
        folder = self._lean_folder(model_id, base, adapter, dtype)
        if folder is not None:
            from finpipe.inference.lean import LeanChatModel

            int8 = self.decode is not None and self.decode.int8_on("cpu")
            model = LeanChatModel(folder, int8=int8)
            precision = model.weights + (", int8 decode steps" if model.model.int8 else "")
            drafts = f"off: {model.no_drafts}" if model.no_drafts else f"up to {model.draft_tokens} a step"
            self.log(f"loaded {model_id} in {time.perf_counter() - started:.1f} s (PyTorch, {precision}, lean decoder "
                     f"on {folder}; drafts {drafts})")
            return LoadedModel(model_id, label, model, self._tokenizer(model_id, base, adapter), base, adapter,
                               engine="torch", precision=precision, decoder="lean")
        model, tokenizer = load_chat_model(base["path"], adapter, merge=adapter is not None, decode=self.decode,
                                           dtype=dtype)
        precision = str(next(model.parameters()).dtype).removeprefix("torch.") + \
            (", int8 decode steps" if uses_int8_decode(model) else "")
        self.log(f"loaded {model_id} in {time.perf_counter() - started:.1f} s (PyTorch, {precision})")
        return LoadedModel(model_id, label, model, tokenizer, base, adapter, engine="torch", precision=precision)

    def _lean_folder(self, model_id: str, base: dict, adapter: str | None, dtype) -> Path | None:
        """The merged folder an adapter is decoded from by the lean decoder (as ``ask`` does, so both give the same
        text), or None for transformers: on a GPU, for the base model, for an architecture it does not mirror, and
        for a non-champion run not merged yet (merging it here would push the champion's folder out of the cache).
        The champion's folder is written at promotion; an older lake's is merged now, once."""
        from finpipe import runtime
        from finpipe.inference import lean
        from finpipe.models import merged

        if adapter is None or runtime.accelerator() != "cpu":
            return None
        said = str(dtype).removeprefix("torch.")
        folder = merged.cached(self.lake_dir, model_id, Path(base["path"]), Path(adapter), said)
        if folder is None and model_id == self._pointed_champion():
            try:
                folder = merged.build(self.lake_dir, model_id, Path(base["path"]), Path(adapter), said, log=self.log)
            except ValueError as exc:  # a folder finpipe did not write is in the way: left alone, transformers
                self.log(f"not merging {model_id}: {exc}")
                return None
        return folder if folder is not None and lean.supports(folder) is None else None

    def _pointed_champion(self) -> str | None:
        """The run the champion pointer names now (the one being loaded to become current), None if unreadable."""
        from finpipe.models import registry

        try:
            return registry.read_pointer(registry.champion_pointer(self.lake_dir),
                                         required=registry.ADAPTER_POINTER_FIELDS)["run_id"]
        except (FileNotFoundError, ValueError):
            return None

    def _load_gguf(self, model_id: str, base: dict, adapter: str | None, gguf) -> LoadedModel:
        """The run's GGUF export in llama.cpp, after checking the file is the one its export recorded; with finpipe's
        tokenizer of the run, which makes its prompts and reads its answers."""
        from finpipe.inference.exported import check_hash
        from finpipe.runtime import cpu_share
        from finpipe.serving import gguf_engine

        started = time.perf_counter()
        check_hash(gguf)
        tokenizer = self._tokenizer(model_id, base, adapter)
        model = gguf_engine.load(gguf.path, cpu_share())
        self.log(f"loaded {model_id} in {time.perf_counter() - started:.1f} s (llama.cpp, {model.precision} GGUF "
                 f"{gguf.path}, {model.threads} threads)")
        return LoadedModel(model_id, f"adapter {model_id} on {base['name']}, GGUF", model, tokenizer, base, adapter,
                           engine="llama.cpp", precision=model.precision, gguf=gguf)

    def champion_model(self) -> LoadedModel | None:
        with self._lock:
            if self.champion_id is None:
                return None
            return self._loaded.get(_key(self.champion_id, self._champion_gguf))

    @property
    def loaded_ids(self) -> list[str]:
        """The loaded models' ids (a run on llama.cpp as ``<run id> (llama.cpp)``)."""
        with self._lock:
            return [m.id + (" (llama.cpp)" if m.engine == "llama.cpp" else "") for m in self._loaded.values()]

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
            champion = _key(self.champion_id, self._champion_gguf) if self.champion_id is not None else None
            if champion in self._loaded or "base" in self._loaded:
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
        run_id = champion["run_id"]
        try:  # on which engine (finpipe.serving.engine_choice): a GGUF export to try first, or PyTorch only
            candidates, note = champion_candidates(self.lake_dir, self.engine, self.gguf, run_id)
        except (ValueError, FileNotFoundError, ImportError) as exc:  # --engine llama.cpp and no usable export
            return self.note_problem(f"the champion {run_id} cannot run on llama.cpp: {exc}{keeping}")
        if run_id == self.champion_id and candidates[0] == self._champion_gguf:
            return self.note_problem(None)
        failed = []
        for gguf in candidates:
            try:
                loaded = self.load(run_id, champion["base"], champion["path"], gguf)  # before it becomes current
                break
            except ApiError as exc:
                failed.append(exc.message)
        else:
            return self.note_problem(f"the champion pointer {pointer} names {run_id}, which cannot be "
                                     f"loaded ({'; '.join(failed)}){keeping}")
        if failed:  # auto: its GGUF did not load, PyTorch did
            note = f"{failed[0]}: running it on PyTorch"
        with self._lock:
            previous, self.champion_id, self._champion = self.champion_id, run_id, champion
            self._champion_gguf, self.engine_note = loaded.gguf, note
            self.champion_problem = None
        if note:
            self.log(note)
        self.log(f"champion is now {run_id} on {loaded.engine} ({loaded.precision})"
                 + (f" (was {previous})" if previous and previous != run_id else ""))
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

    def stop(self, close: bool = False) -> None:
        """Stop watching the champion; ``close`` (nothing generates any more): free llama.cpp's models now, while the
        interpreter is whole (llama-cpp-python freeing them at exit prints a TypeError)."""
        self._stop.set()
        if close:
            with self._lock:
                models = [m for m in self._loaded.values() if m.engine == "llama.cpp"]
            for loaded in models:
                loaded.model.llm.close()
