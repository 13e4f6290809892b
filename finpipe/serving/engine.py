"""One generation at a time, queued: on a CPU two concurrent generations only thrash the cores.

Requests wait in a bounded queue (a full queue answers 503 at once instead of piling up). The worker takes the
next request and, when it is a plain (non-streamed) one, every queued request it can answer in the same batch
(same model, same sampling): on a CPU a decoding step costs about the same for one sequence or several, so
concurrent clients are served together. Streamed requests are generated alone, token by token, and so are seeded
sampled ones (a batch's other rows would draw from the same random numbers).

Every generation checks, after each token, whether its request is cancelled (a streaming client went away) or has
reached one of its stop strings: either ends it there, so a departed client frees the worker at once instead of
holding every other client for up to the generation timeout.

A model run by llama.cpp (``LoadedModel.engine == "llama.cpp"``, ``finpipe.serving.gguf_engine``) is generated the
same way, one request at a time: llama.cpp requests are never batched.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field

from finpipe.evaluation.generation import Generated, Sampling
from finpipe.serving.models import LoadedModel
from finpipe.serving.protocol import ApiError, cut_at_stop, find_stop


class TextStream:
    """A streamed answer's text pieces, as the server reads a transformers ``TextIteratorStreamer``: iterate until
    ``end``."""

    _END = object()

    def __init__(self) -> None:
        self._pieces: queue.Queue = queue.Queue()

    def put_text(self, text: str) -> None:
        if text:
            self._pieces.put(text)

    def end(self) -> None:
        self._pieces.put(self._END)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        piece = self._pieces.get()
        if piece is self._END:
            raise StopIteration
        return piece


@dataclass
class Job:
    loaded: LoadedModel
    messages: list[dict[str, str]]
    sampling: Sampling
    streamer: object | None = None  # streamed requests: a TextIteratorStreamer (transformers), else a TextStream
    stop: tuple[str, ...] = ()  # the answer ends before the first of these
    seed: int | None = None  # seeds the sampler: the same seed and sampling give the same answer
    cancel: threading.Event = field(default_factory=threading.Event)  # set when nobody waits for the answer
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def seeded(self) -> bool:
        return self.seed is not None and self.sampling.temperature > 0


@dataclass
class Served(Generated):
    """A generation as the server hands it back: ``stopped`` when a stop string cut it (finish_reason "stop")."""

    stopped: bool = False
    queued_s: float = 0.0  # from submission to the start of its generation
    wall_s: float = 0.0  # the generation's wall time (a batch's: each of its rows waited for all of it)


class Engine:
    """The generation worker: one thread runs every model computation of the server, generations and, through
    ``call``, loads. Why one: PyTorch's OpenMP gives each thread that computes a team of its own, and once the
    teams hold more threads than the machine has cores, libgomp stops its workers spinning between parallel regions;
    the lean decoder's small per-token kernels then ran at 36 instead of 57 tokens/s (2-core AMD EPYC)."""

    def __init__(self, batch_size: int = 8, queue_limit: int = 32, log=print):
        self.batch_size, self.log = batch_size, log
        self._calls: queue.Queue[tuple] = queue.Queue()
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_limit)
        self._pending: list[Job] = []
        self._stop = threading.Event()
        self.served = self.batches = self.cancelled = self.active = 0
        self._worker = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def submit(self, job: Job) -> Future:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy ({self._queue.maxsize} requests waiting): retry shortly",
                           type_="server_error", code="server_busy") from None
        return job.future

    def call(self, fn):
        """``fn()`` run on the worker thread between generations (a model load): its result, or its exception."""
        if threading.current_thread() is self._worker:
            return fn()
        if self._stop.is_set():
            raise RuntimeError("the server is stopping")
        done: Future = Future()
        self._calls.put((fn, done))
        while True:
            try:
                return done.result(timeout=1.0)
            except FutureTimeout:
                if not self._worker.is_alive():  # stopped after the call was queued
                    raise RuntimeError("the server is stopping") from None

    def stop(self, wait_s: float = 0.0) -> bool:
        """Stop taking jobs; with ``wait_s``, wait that long for the worker to end. True when it has ended."""
        self._stop.set()
        self._worker.join(wait_s)
        return not self._worker.is_alive()

    def _run_calls(self) -> None:
        while True:
            try:
                fn, done = self._calls.get_nowait()
            except queue.Empty:
                return
            if self._stop.is_set():
                done.set_exception(RuntimeError("the server is stopping"))
                continue
            try:
                done.set_result(fn())
            except BaseException as exc:  # the caller gets it; the worker goes on
                done.set_exception(exc)

    def _next(self) -> Job | None:
        self._run_calls()
        if self._pending:
            return self._pending.pop(0)
        try:
            return self._queue.get(timeout=0.05)
        except queue.Empty:
            return None

    def _companions(self, first: Job) -> list[Job]:
        """Queued plain requests that can share ``first``'s batch; the others stay queued, in order."""
        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        batch, rest = [first], []
        for job in self._pending:
            if (len(batch) < self.batch_size and job.streamer is None and not job.seeded
                    and job.loaded is first.loaded and job.sampling == first.sampling):
                batch.append(job)
            else:
                rest.append(job)
        self._pending = rest
        return batch

    def _drop(self, job: Job) -> None:
        """A job cancelled while it waited: never generated."""
        job.future.cancel()
        if job.streamer is not None:
            job.streamer.end()
        self.cancelled += 1

    def _run(self) -> None:
        from finpipe.evaluation.generation import generate, generate_batch
        from finpipe.runtime import rebalance

        while not self._stop.is_set():
            job = self._next()
            if job is None:
                continue
            if job.cancel.is_set():
                self._drop(job)
                continue
            llama = job.loaded.engine == "llama.cpp"
            lean = job.loaded.decoder == "lean"
            batch = [job] if job.streamer is not None or job.seeded or llama or lean else self._companions(job)
            started = time.perf_counter()
            self.active = len(batch)
            try:
                model, tokenizer = job.loaded.model, job.loaded.tokenizer
                if llama or lean:
                    if lean:
                        rebalance()
                    results = [_generate_gguf(job) if llama else _generate_lean(job)]
                    self._done(batch, results, started)
                    continue
                rebalance()
                criteria = _ends(batch, tokenizer)
                if job.seeded:
                    import torch

                    torch.manual_seed(job.seed)
                if job.streamer is not None:
                    results: list[Generated] = [generate(model, tokenizer, job.messages, job.sampling,
                                                         streamer=job.streamer, stopping_criteria=criteria)]
                elif len(batch) == 1:
                    results = [generate(model, tokenizer, job.messages, job.sampling, stopping_criteria=criteria)]
                else:
                    results = generate_batch(model, tokenizer, [j.messages for j in batch], job.sampling,
                                             batch_size=len(batch), stopping_criteria=criteria)
                self._done(batch, results, started)
            except Exception as exc:  # a failed generation fails its requests, never the worker
                self.log(f"generation failed: {exc!r}")
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)
                if job.streamer is not None:
                    job.streamer.end()
            finally:
                self.active = 0
                self.served += len(batch)
                self.batches += 1

    def _done(self, batch: list[Job], results: list[Generated], started: float) -> None:
        wall = time.perf_counter() - started
        for j, result in zip(batch, results):
            if j.cancel.is_set():
                self.cancelled += 1
                self.log(f"stopped a generation after {result.new_tokens} tokens: its client went away")
            j.future.set_result(_served(j, result, started - j.queued_at, wall))


def _generate_gguf(job: Job) -> Generated:
    from finpipe.serving import gguf_engine

    try:
        return gguf_engine.generate(job.loaded.model, job.loaded.tokenizer, job.messages, job.sampling, stop=job.stop,
                                    cancel=job.cancel, seed=job.seed, streamer=job.streamer)
    finally:
        if job.streamer is not None:
            job.streamer.end()


def _generate_lean(job: Job) -> Generated:
    """A request on the lean decoder (``finpipe.inference.lean``): one at a time, like llama.cpp, since a single
    lean decode step costs less than a batched transformers one shared by four."""
    chat = job.loaded.model
    if job.seeded:
        import torch

        torch.manual_seed(job.seed)
    try:
        return follow_tokens(chat.tokens(job.messages, job.sampling), chat.tokenizer.decode, chat.stops, job.sampling,
                             time.perf_counter(), stop=job.stop, cancel=job.cancel, streamer=job.streamer)
    finally:
        if job.streamer is not None:
            job.streamer.end()


def follow_tokens(tokens, decode, ends: set[int], sampling: Sampling, started: float, *, stop=(), cancel=None,
                  streamer=None) -> Generated:
    """Read an engine's token ids until an end-of-turn token, ``max_new_tokens``, ``max_time_s``, one of ``stop``
    (strings), or ``cancel`` (an Event); stream the text as it grows. ``decode``: ids -> text without special
    tokens. ``new_tokens`` counts the end-of-turn token, as transformers' ``generate`` does; the text is stripped."""
    ids: list[int] = []
    sent = ""  # the text streamed so far
    ended = False
    for token in tokens:
        ids.append(int(token))
        if token in ends:
            ended = True
            break
        text = None
        if streamer is not None:
            text = decode(ids)
            if not text.endswith("\ufffd"):  # a character still incomplete: wait for its other bytes
                streamer.put_text(text[len(sent):])
                sent = text
        if stop and (find_stop(text, tuple(stop)) is not None if text is not None
                     else _stop_in_text(decode, ids, tuple(stop))):
            break
        if len(ids) >= sampling.max_new_tokens or (cancel is not None and cancel.is_set()) or (
                sampling.max_time_s is not None and time.perf_counter() - started > sampling.max_time_s):
            break
    seconds = time.perf_counter() - started
    text = decode(ids[:-1] if ended else ids)
    if streamer is not None:
        streamer.put_text(text[len(sent):] if text.startswith(sent) else "")
    return Generated(text=text.strip(), new_tokens=len(ids), seconds=seconds)


def _served(job: Job, result: Generated, queued_s: float = 0.0, wall_s: float = 0.0) -> Served:
    text, stopped = cut_at_stop(result.text, job.stop) if job.stop else (result.text, False)
    return Served(**(asdict(result) | {"text": text}), stopped=stopped, queued_s=queued_s, wall_s=wall_s)


def _ends(batch: list[Job], tokenizer):
    """A stopping criterion ending each row whose job was cancelled or whose text reached one of its stop strings."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Ends(StoppingCriteria):
        start: int | None = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.start is None:  # first call: one token past the (left-padded) prompts
                self.start = input_ids.shape[1] - 1
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for row, job in enumerate(batch):
                if job.cancel.is_set():
                    done[row] = True
                elif job.stop and stop_reached(tokenizer, input_ids[row, self.start:].tolist(), job.stop):
                    done[row] = True
            return done

    return StoppingCriteriaList([Ends()])


def stop_reached(tokenizer, ids: list[int], stops: tuple[str, ...]) -> bool:
    """Whether the text of ``ids`` holds one of ``stops`` (``find_stop``'s rule), ``tokenizer`` a transformers one."""
    return _stop_in_text(lambda x: tokenizer.decode(x, skip_special_tokens=True), ids, stops)


def _stop_in_text(decode, ids: list[int], stops: tuple[str, ...]) -> bool:
    """Checked after every token, so only a stop string ending in the newest tokens can be new: the last few tokens
    are decoded (a token is at least a byte, a character at most 4), and the whole text only when they hold one."""
    window = 4 * max(len(s) for s in stops) + 4
    if len(ids) > window and not any(s in decode(ids[-window:]) for s in stops):
        return False
    return find_stop(decode(ids), stops) is not None
