"""GpuBatcher on CPU with the real bundled model: chunks of concurrent jobs share decode batches,
each job gets back its own segments, and a job behind a long one is not starved."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from faster_whisper import decode_audio

from app.messages import Chunk, TranscribeOptions
from workers.batcher import Abandoned, Cancellable, CancelToken, GpuBatcher
from workers.engines.base import FAST

OPTIONS = TranscribeOptions(beam_size=1)


class Recording:
    """The real engine, with a record of each call's chunk starts (what shared a batch),
    recorded as the call begins."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.name, self.model_name = engine.name, engine.model_name
        self.calls: list[list[float]] = []

    def transcribe_batch(self, audio, chunks, options, decoding=FAST):
        self.calls.append([c.start for c in chunks])
        return self.engine.transcribe_batch(audio, chunks, options, decoding)


@pytest.fixture(scope="module")
def jfk(data_dir) -> np.ndarray:
    return decode_audio(str(data_dir / "jfk.flac"))


def pieces(audio: np.ndarray, offset: float, n: int) -> tuple[list[np.ndarray], list[Chunk]]:
    """n chunks of the speech, placed at ``offset`` s in a job's own timeline (index 0..n-1 in every job)."""
    cuts = [(0.0, 4.5), (4.5, 8.1), (8.1, 11.0)]
    audio_parts, chunks = [], []
    for i in range(n):
        a, b = cuts[i % 3]
        audio_parts.append(audio[int(a * 16000) : int(b * 16000)])
        start = offset + 20 * i
        chunks.append(Chunk(index=i, start=start, end=start + (b - a)))
    return audio_parts, chunks


def run_all(batcher, jobs: dict[str, tuple], stagger: float = 0.0) -> tuple[dict, dict]:
    results, finished = {}, {}

    def one(name):
        audio, chunks = jobs[name]
        results[name] = batcher.transcribe_batch(audio, chunks, OPTIONS)
        finished[name] = time.monotonic()

    threads = []
    for name in jobs:
        t = threading.Thread(target=one, args=(name,))
        t.start()
        threads.append(t)
        time.sleep(stagger)
    for t in threads:
        t.join(120)
    return results, finished


def test_two_jobs_share_a_batch_and_get_their_own_segments(engines, jfk):
    engine = Recording(engines.get(OPTIONS))
    batcher = GpuBatcher(engine, batch_size=8, max_wait_ms=300)
    try:
        jobs = {"a": pieces(jfk, 0.0, 2), "b": pieces(jfk, 1000.0, 3)}
        results, _ = run_all(batcher, jobs)
    finally:
        batcher.close()
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 5  # one model call for both jobs
    assert batcher.stats.shared_batches == 1 and batcher.stats.fill_ratio == 5 / 8
    for name, (audio, chunks) in jobs.items():
        segments, language = results[name]
        assert language == "en" and segments
        for seg in segments:  # routed back to its own job, with that job's chunk index
            chunk = chunks[seg.chunk]
            assert chunk.start <= seg.start <= seg.end <= chunk.end, (name, seg)
        text = " ".join(s.text for s in segments).lower()
        assert "fellow americans" in text and "country can do for you" in text
    assert "ask what you can do" in " ".join(s.text for s in results["b"][0]).lower()  # b's third chunk


def test_a_short_job_is_not_starved_by_a_long_one(engines, jfk):
    engine = Recording(engines.get(OPTIONS))
    batcher = GpuBatcher(engine, batch_size=4, max_wait_ms=400)
    try:
        # "first" fills a batch and keeps the model busy; meanwhile "long" (9 chunks) arrives,
        # and "short" (1 chunk) just behind it
        jobs = {"first": pieces(jfk, 9000.0, 4), "long": pieces(jfk, 0.0, 9), "short": pieces(jfk, 5000.0, 1)}
        results, finished = run_all(batcher, jobs, stagger=0.05)
    finally:
        batcher.close()
    assert [len(c) for c in engine.calls] == [4, 4, 4, 2]
    assert 5000.0 in engine.calls[1]  # round-robin: the short job rides in the next batch
    assert finished["short"] < finished["long"]
    assert len({s.chunk for s in results["long"][0]}) == 9 and {s.chunk for s in results["short"][0]} == {0}


def test_an_engine_error_reaches_every_job_in_the_batch(engines, jfk):
    engine = engines.get(OPTIONS)
    batcher = GpuBatcher(engine, batch_size=8, max_wait_ms=200)
    try:
        audio, chunks = pieces(jfk, 0.0, 1)
        errors = []

        def bad():
            try:  # a chunk whose audio is not audio at all
                batcher.transcribe_batch([np.zeros((3, 3, 3), np.float32)], chunks, OPTIONS)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        t = threading.Thread(target=bad)
        t.start()
        with pytest.raises(Exception):
            batcher.transcribe_batch(audio, chunks, OPTIONS)
        t.join(60)
        assert errors
        # and the batcher goes on working
        segments, _ = batcher.transcribe_batch(audio, chunks, OPTIONS)
        assert segments
    finally:
        batcher.close()


# -- abandoned work (a timed-out transcribe) leaves the GPU's queue ----------------------------


def wait_for(predicate, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        time.sleep(0.005)


def test_an_abandoned_request_leaves_the_queue_and_its_thread_returns(engines, jfk):
    engine = Recording(engines.get(OPTIONS))
    batcher = GpuBatcher(engine, batch_size=2, max_wait_ms=0)
    token = CancelToken()
    audio, chunks = pieces(jfk, 0.0, 8)  # four model calls' worth
    ended: dict[str, float] = {}

    def abandoned_job():
        with pytest.raises(Abandoned):
            batcher.transcribe_batch(audio, chunks, OPTIONS, cancel=token)
        ended["at"] = time.monotonic()

    t = threading.Thread(target=abandoned_job)
    try:
        t.start()
        wait_for(lambda: engine.calls)  # its first model call is under way
        cancelled_at = time.monotonic()
        token.cancel()
        t.join(10)
        assert ended["at"] - cancelled_at < 0.2  # at once, not after the call under way
        # the next job is served right after the call under way: nothing else of the first is decoded
        segments, _ = batcher.transcribe_batch(*pieces(jfk, 5000.0, 1), OPTIONS)
    finally:
        batcher.close()
    assert segments and engine.calls == [[0.0, 20.0], [5000.0]]
    assert batcher.stats.dropped == 6 and batcher.stats.as_dict()["dropped"] == 6
    # a token cancelled before the call: nothing is queued, nothing decoded
    gone = Cancellable(GpuBatcher(engine, batch_size=2), token)
    with pytest.raises(Abandoned):
        gone.transcribe_batch(audio, chunks, OPTIONS)
    gone.engine.close()
    assert len(engine.calls) == 2 and gone.model_name == engine.model_name


def test_a_timed_out_transcribe_stops_using_the_model(engines, jfk, tmp_path):
    """The transcribe stage under its deadline (``workers.runtime.policy.within``): when the deadline fires,
    the stage's chunks still queued in the GPU worker's batcher are dropped and its thread ends,
    so the retry does not find the model busy with the same chunks."""
    import anyio

    from app.config import Settings
    from app.messages import ChunkBatch, TranscribeRequest
    from app.storage import LocalStorage
    from workers import stages
    from workers.runtime.policy import within as _within
    from workers.gpu_worker import GpuEngines

    settings = Settings.from_env({"VTP_ENGINE": "ctranslate2", "VTP_DEVICE": "cpu", "VTP_DECODE_BATCH": "1"})
    calls: list[Recording] = []

    def factory(options):
        calls.append(Recording(engines.get(OPTIONS)))
        return calls[-1]

    pool = GpuEngines(settings, factory=factory)
    pool.load_all()
    storage = LocalStorage(tmp_path)
    audio, chunks = pieces(jfk, 0.0, 12)
    data = b"".join((np.clip(a, -1, 1) * 32767).astype("<i2").tobytes()[: 2 * c.samples] for a, c in zip(audio, chunks))
    batch = ChunkBatch(index=0, chunks=chunks, audio_key="jobs/j/batches/00000.pcm")
    ctx = stages.StageContext(storage=storage, settings=settings, engines=pool)
    (engine,) = calls
    batcher = pool.get(OPTIONS)

    async def run() -> None:
        await storage.put_bytes(batch.audio_key, data)
        with pytest.raises(TimeoutError):
            await _within(0.5, stages.transcribe(ctx, TranscribeRequest(job_id="j", batch=batch, options=OPTIONS)))

    try:
        anyio.run(run)
        timed_out = len(engine.calls)
        wait_for(lambda: batcher.stats.dropped > 0, timeout=5, what="the abandoned chunks to be dropped")
        time.sleep(1.5)  # what the old code went on decoding meanwhile
        assert len(engine.calls) <= timed_out + 1, engine.calls  # at most the call under way
        assert len(engine.calls) < len(chunks)
    finally:
        batcher.close()
