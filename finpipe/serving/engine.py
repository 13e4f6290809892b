"""One generation at a time, queued: on a CPU two concurrent generations only thrash the cores.

Requests wait in a bounded queue (a full queue answers 503 at once instead of piling up). The worker takes the
next request and, when it is a plain (non-streamed) one, every queued request it can answer in the same batch
(same model, same sampling): on a CPU a decoding step costs about the same for one sequence or several, so
concurrent clients are served together. Streamed requests are generated alone, token by token.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from finpipe.evaluation.generation import Generated, Sampling
from finpipe.serving.models import LoadedModel
from finpipe.serving.protocol import ApiError


@dataclass
class Job:
    loaded: LoadedModel
    messages: list[dict[str, str]]
    sampling: Sampling
    streamer: object | None = None  # a TextIteratorStreamer for streamed requests
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


class Engine:
    def __init__(self, batch_size: int = 8, queue_limit: int = 32, log=print):
        self.batch_size, self.log = batch_size, log
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_limit)
        self._pending: list[Job] = []
        self._stop = threading.Event()
        self.served = self.batches = 0
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

    def stop(self) -> None:
        self._stop.set()

    def _next(self) -> Job | None:
        if self._pending:
            return self._pending.pop(0)
        try:
            return self._queue.get(timeout=0.2)
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
            if (len(batch) < self.batch_size and job.streamer is None and job.loaded is first.loaded
                    and job.sampling == first.sampling):
                batch.append(job)
            else:
                rest.append(job)
        self._pending = rest
        return batch

    def _run(self) -> None:
        from finpipe.evaluation.generation import generate, generate_batch
        from finpipe.runtime import rebalance

        while not self._stop.is_set():
            job = self._next()
            if job is None:
                continue
            batch = [job] if job.streamer is not None else self._companions(job)
            rebalance()
            try:
                if job.streamer is not None:
                    results: list[Generated] = [generate(job.loaded.model, job.loaded.tokenizer, job.messages,
                                                         job.sampling, streamer=job.streamer)]
                elif len(batch) == 1:
                    results = [generate(job.loaded.model, job.loaded.tokenizer, job.messages, job.sampling)]
                else:
                    results = generate_batch(job.loaded.model, job.loaded.tokenizer, [j.messages for j in batch],
                                             job.sampling, batch_size=len(batch))
                for j, result in zip(batch, results):
                    j.future.set_result(result)
            except Exception as exc:  # a failed generation fails its requests, never the worker
                self.log(f"generation failed: {exc!r}")
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)
                if job.streamer is not None:
                    job.streamer.end()
            self.served += len(batch)
            self.batches += 1
