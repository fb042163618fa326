"""One decode batch across jobs: the GPU worker's dynamic batcher.

A GPU worker runs several ``transcribe`` jobs at once (``VTP_GPU_JOBS``); each hands its
chunks to the ``GpuBatcher`` of its model, which is an Engine itself (the stage calls
``transcribe_batch`` from a worker thread and blocks until its own chunks are done). One model
thread fills a batch up to ``VTP_DECODE_BATCH`` chunks, or whatever has arrived once the oldest
waiting chunk has waited ``VTP_BATCH_WAIT_MS``, runs the engine on it, and routes each chunk's
segments back to the job it came from. So short videos from different users share a batch, and
the GPU is never idle while work waits.

**Fair:** a batch is filled round-robin, one chunk from each waiting request in turn (oldest
request first), so a request with many chunks (a long video, or a coverage repair re-decoding
many gaps) cannot hold back one that arrived behind it by more than one chunk per batch.

Chunks are batched only with chunks decoded the same way (beam size, language, task, word
timings): those are the job's options the engine reads; everything about the hardware is the
worker's. **Every chunk in its own job's language:** on a multilingual model a request always
carries a concrete language before it is queued (the runners detect a job's language from its
first speech; a request that still names none is split by each chunk's detected language,
``workers.languages``), and the language is part of the group key, so one model call never
decodes a Spanish job's chunks in the English of its neighbours.

The fan-out unit (``VTP_BATCH_SIZE`` chunks per transcribe job) is separate from the decode
batch: many small jobs fill one decode batch.

**Abandoned work leaves.** A stage that gives up on its chunks (its deadline passed, or the
worker stopped at once) cancels its ``CancelToken``: its chunks not yet in a decode batch are
dropped from the queue, its waiting thread returns at once (``Abandoned``), and nothing of it is
decoded after the model call already under way. So a timed-out transcribe does not keep the GPU
busy while its retry submits the same chunks again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from app.messages import Chunk, Segment, TranscribeOptions
from workers import languages
from workers.engines.base import FAST, Decoding, Engine

log = logging.getLogger("vtp.batcher")


class Abandoned(Exception):
    """Raised in the thread of a request whose stage gave up on it (``CancelToken.cancel``).
    Never reaches a job: the stage that would have read the answer has gone already."""


class CancelToken:
    """Set once, from any thread: the work it was handed with is no longer wanted. Callbacks
    registered with ``on_cancel`` run then (or at once, if it is set already)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` on cancel; returns what unregisters it."""
        with self._lock:
            if not self.cancelled:
                self._callbacks.append(callback)
                return lambda: self._forget(callback)
        callback()
        return lambda: None

    def _forget(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)


class Cancellable:
    """An engine bound to one stage's ``CancelToken``: once it is cancelled, no further call
    starts, and a ``GpuBatcher`` drops the chunks the stage is waiting for (see the module
    docstring). What ``stages.transcribe`` hands the coverage code."""

    def __init__(self, engine: Any, token: CancelToken) -> None:
        self.engine = engine
        self.token = token

    def __getattr__(self, name: str) -> Any:  # name, model_name, ...: the engine's own
        return getattr(self.engine, name)

    def transcribe_batch(
        self, audio: list[np.ndarray], chunks: list[Chunk], options: TranscribeOptions, decoding: Decoding = FAST
    ) -> tuple[list[Segment], str]:
        if self.token.cancelled:
            raise Abandoned("the stage gave up on this batch")
        if isinstance(self.engine, GpuBatcher):
            return self.engine.transcribe_batch(audio, chunks, options, decoding, cancel=self.token)
        return self.engine.transcribe_batch(audio, chunks, options, decoding)


@dataclass
class BatcherStats:
    """Counters since start: what ``/metrics`` shows (published by the GPU worker)."""

    batches: int = 0
    chunks: int = 0
    #: Chunks a full batch would have held, summed over batches: fill ratio = chunks / slots.
    slots: int = 0
    #: Model calls that mixed chunks of several requests.
    shared_batches: int = 0
    #: Model calls made while a request to be decoded another way (another language, task, beam
    #: size or ladder rung) waited beside them: requests the group keys kept out of the call.
    kept_apart: int = 0
    last_batch: int = 0
    busy_seconds: float = 0.0
    #: Chunks dropped before their decode because the stage that sent them gave up on them.
    dropped: int = 0

    @property
    def fill_ratio(self) -> float:
        return self.chunks / self.slots if self.slots else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "batches": self.batches,
            "chunks": self.chunks,
            "slots": self.slots,
            "shared_batches": self.shared_batches,
            "kept_apart": self.kept_apart,
            "last_batch": self.last_batch,
            "fill_ratio": round(self.fill_ratio, 4),
            "busy_seconds": round(self.busy_seconds, 3),
            "dropped": self.dropped,
        }


@dataclass(eq=False)
class _Request:
    audio: list[np.ndarray]
    chunks: list[Chunk]
    options: TranscribeOptions
    arrived: float
    todo: deque = field(default_factory=deque)  # indexes of chunks not yet in a batch
    decoding: Decoding = FAST
    results: dict[int, list[Segment]] = field(default_factory=dict)
    language: str = ""
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple:
        o = self.options
        return (o.beam_size, o.language, o.task, o.word_timestamps, self.decoding)


class GpuBatcher:
    """An Engine that batches ``transcribe_batch`` calls from many threads into shared model calls."""

    def __init__(self, engine: Engine, *, batch_size: int = 16, max_wait_ms: float = 30.0) -> None:
        self.engine = engine
        self.name = engine.name
        self.model_name = engine.model_name
        self.multilingual = languages.multilingual(engine)
        #: Calls are queued into one model thread's batches: more at once gain nothing.
        self.parallel_calls = 1
        self.batch_size = max(1, batch_size)
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.stats = BatcherStats()
        self._waiting: list[_Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"batcher-{engine.model_name}", daemon=True)
        self._thread.start()

    # -- the Engine interface: called by the stage, in its own thread -----------------------

    def transcribe_batch(
        self, audio: list[np.ndarray], chunks: list[Chunk], options: TranscribeOptions, decoding: Decoding = FAST,
        cancel: CancelToken | None = None,
    ) -> tuple[list[Segment], str]:
        """Blocks until this request's chunks are decoded; with ``cancel``, returns at once
        (``Abandoned``) when it is cancelled, its chunks not yet in a batch dropped."""
        if not audio:
            return [], options.language or "en"
        if options.language is None and self.multilingual:  # never queued without a language
            return languages.transcribe_by_language(self, audio, chunks, options, decoding)
        request = _Request(audio, chunks, options, time.monotonic(), deque(range(len(chunks))), decoding=decoding)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._waiting.append(request)
            self._cond.notify_all()
        forget = cancel.on_cancel(lambda: self._drop(request)) if cancel is not None else None
        try:
            request.done.wait()
        finally:
            if forget is not None:
                forget()
        if request.error is not None:
            raise request.error
        return [seg for i in range(len(chunks)) for seg in request.results.get(i, [])], request.language

    def _drop(self, request: _Request) -> None:
        """The request's stage gave up: its chunks not yet taken leave the queue, its thread returns."""
        with self._cond:
            if request.done.is_set():
                return
            if request in self._waiting:
                self._waiting.remove(request)
            self.stats.dropped += len(request.todo)
            request.todo.clear()
            request.error = Abandoned("the stage gave up on these chunks")
            request.done.set()

    def detect_languages(self, audio: list[np.ndarray]) -> list[tuple[str, float]]:
        """Straight to the engine, from the caller's thread (engines are thread-safe): detection
        is per request and never shares a call."""
        return self.engine.detect_languages(audio)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(5)

    # -- the model thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            picked = self._next_batch()
            if picked is None:
                return
            self._decode(picked)

    def _next_batch(self) -> list[tuple[_Request, int]] | None:
        """Wait for work, then for the batch to fill (or the oldest chunk's wait to run out)."""
        with self._cond:
            while True:
                if self._closed:
                    for r in self._waiting:
                        r.error = RuntimeError("the batcher closed before this batch ran")
                        r.done.set()
                    return None
                if self._waiting:
                    oldest = self._waiting[0]
                    group = [r for r in self._waiting if r.key == oldest.key]
                    ready = sum(len(r.todo) for r in group)
                    left = oldest.arrived + self.max_wait - time.monotonic()
                    if ready >= self.batch_size or left <= 0:
                        return self._take(group)
                    self._cond.wait(left)
                else:
                    self._cond.wait()

    def _take(self, group: list[_Request]) -> list[tuple[_Request, int]]:
        self.stats.kept_apart += any(r.key != group[0].key for r in self._waiting)
        picked: list[tuple[_Request, int]] = []
        while len(picked) < self.batch_size and any(r.todo for r in group):
            for r in group:  # round-robin: one chunk from each request in turn
                if r.todo and len(picked) < self.batch_size:
                    picked.append((r, r.todo.popleft()))
        for r in group:
            if not r.todo:
                self._waiting.remove(r)
        return picked

    def _decode(self, picked: list[tuple[_Request, int]]) -> None:
        # Chunk indexes are per job and may collide: renumber for the call, map back after.
        chunks = [msgspec.structs.replace(r.chunks[i], index=k) for k, (r, i) in enumerate(picked)]
        audio = [r.audio[i] for r, i in picked]
        requests = list(dict.fromkeys(r for r, _ in picked))
        started = time.perf_counter()
        try:
            segments, language = self.engine.transcribe_batch(audio, chunks, picked[0][0].options, picked[0][0].decoding)
        except BaseException as exc:  # noqa: BLE001 - handed to every job in the batch
            log.warning("decode batch of %d chunks from %d jobs failed: %s", len(picked), len(requests), exc)
            for r in requests:
                r.error = exc
                r.todo.clear()
                r.done.set()
            with self._cond:
                self._waiting = [w for w in self._waiting if w.error is None]
            return
        elapsed = time.perf_counter() - started
        by_chunk: dict[int, list[Segment]] = {}
        for seg in segments:
            by_chunk.setdefault(seg.chunk, []).append(seg)
        for k, (r, i) in enumerate(picked):
            r.results[i] = [msgspec.structs.replace(s, chunk=r.chunks[i].index) for s in by_chunk.get(k, [])]
            r.language = language
        s = self.stats
        s.batches += 1
        s.chunks += len(picked)
        s.slots += self.batch_size
        s.shared_batches += len(requests) > 1
        s.last_batch = len(picked)
        s.busy_seconds += elapsed
        for r in requests:
            if len(r.results) == len(r.chunks):
                r.done.set()
