"""Long and "bomb" inputs (``VTP_MAX_DURATION``) and progress while extracting.

A bomb is a tiny file that decodes to hours (10 h of silence in FLAC is ~70 kB): it is refused
from its declared duration before anything is decoded, in ``vtp transcribe`` and ``vtp submit``
alike; a stream that declares no duration is cut by ffmpeg just past the limit and refused then.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from app import errors
from app.config import Settings
from app.jobs import JobStore
from app.media import check_media_file, ffmpeg_exe, probe_duration
from app.messages import ExtractRequest, ProgressEvent, TranscribeOptions
from app.storage import LocalStorage
from tests.support.dag_cluster import ROOT
from tests.support.dag_cluster import Cluster, clean_environ
from tests.support.media import make_silence
from workers import stages
from workers.local_runner import LocalRunner

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

BOMB_REASON = "bomb.flac: 10.0 h of media is over the 6.0 h limit (VTP_MAX_DURATION)"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("long")
    return {
        "bomb": make_silence(d / "bomb.flac", 10 * 3600),  # declares 10 h
        "stream": make_silence(d / "stream.flac", 120, declared=False),  # declares nothing
        "quiet": make_silence(d / "quiet.flac", 50),
    }


def vtp(*args, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**clean_environ(), "PYTHONWARNINGS": "ignore", **(env or {})},
    )


# -- probing ------------------------------------------------------------------------------


async def test_probe_reads_the_declared_duration(data_dir, media, tmp_path):
    assert await probe_duration(data_dir / "jfk.flac", name="jfk.flac") == pytest.approx(11.0, abs=0.1)
    assert await probe_duration(data_dir / "talk_tts.mp4", name="t") == pytest.approx(70.0, abs=1)  # the container's
    assert await probe_duration(media["bomb"], name="bomb.flac") == 36000.0
    assert await probe_duration(media["stream"], name="s") == 0.0  # a piped FLAC declares no length
    junk = tmp_path / "notes.mp4"
    junk.write_text("not a video\n" * 100)
    with pytest.raises(errors.CorruptMedia, match="notes.mp4: not a media file"):
        await probe_duration(junk, name="notes.mp4")
    with pytest.raises(errors.NoAudioStream):
        await probe_duration(data_dir / "no_audio.mp4", name="no_audio.mp4")


async def test_tags_and_names_cannot_pose_as_the_duration(media, tmp_path):
    """ffmpeg prints the file's name and its metadata around the real ``Duration:`` line."""
    tagged = tmp_path / "tagged.flac"
    subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-i", str(media["bomb"]), "-c", "copy",
         "-metadata", "Duration: 00:00:01.00 x=1", "-metadata", "title=a\n  Duration: 00:00:02.00", str(tagged)],
        check=True, timeout=60,
    )
    assert await probe_duration(tagged, name="tagged.flac") == 36000.0
    named = tmp_path / "x\n  Duration: 00:00:03.00, .flac"
    named.write_bytes(media["bomb"].read_bytes())
    assert await probe_duration(named, name="named.flac") == 36000.0


async def test_check_media_file_refuses_what_declares_too_much(data_dir, media, tmp_path):
    with pytest.raises(errors.MediaTooLong) as info:
        await check_media_file(media["bomb"], max_duration=21600)
    assert str(info.value) == BOMB_REASON
    assert info.value.permanent and isinstance(info.value, errors.InputError)
    assert await check_media_file(media["bomb"]) == 0.0  # no limit: not even probed
    assert await check_media_file(data_dir / "jfk.flac", max_duration=60) == pytest.approx(11.0, abs=0.1)
    assert await check_media_file(media["stream"], max_duration=60) == 0.0  # unknown here: extraction enforces
    with pytest.raises(errors.InputNotFound):
        await check_media_file(data_dir / "missing.flac", max_duration=60)
    with pytest.raises(errors.NoAudioStream):
        await check_media_file(data_dir / "no_audio.mp4", max_duration=60)


def test_max_duration_setting():
    assert Settings.from_env({}).max_duration_seconds == 21600
    assert Settings.from_env({"VTP_MAX_DURATION": "0"}).max_duration_seconds is None
    assert Settings.from_env({"VTP_MAX_DURATION": "90.5"}).max_duration_seconds == 90.5
    with pytest.raises(errors.OptionsError, match="VTP_MAX_DURATION"):
        Settings.from_env({"VTP_MAX_DURATION": "6h"})


# -- the extract stage ----------------------------------------------------------------------


async def extract(media_path: Path, tmp_path: Path, settings: Settings, progress=None):
    storage = LocalStorage(tmp_path / "store")
    storage.adopt("jobs/j/media", media_path)
    ctx = stages.StageContext(storage=storage, settings=settings)
    req = ExtractRequest(job_id="j", media_key="jobs/j/media", source_name=media_path.name)
    return storage, await stages.extract_audio(ctx, req, progress=progress)


async def test_extraction_reports_seconds_decoded(data_dir, tmp_path):
    seen: list[tuple[float, float]] = []

    async def progress(done: float, total: float) -> None:
        seen.append((done, total))

    _, extracted = await extract(data_dir / "jfk.flac", tmp_path, Settings(), progress)
    assert seen[0] == (0.0, pytest.approx(11.0, abs=0.1))  # the declared length, before decoding
    assert len(seen) >= 3 and seen[-1][0] == seen[-1][1] == pytest.approx(extracted.duration, abs=0.001)  # the true one
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and all(t == seen[0][1] for _, t in seen[:-1])


async def test_the_last_report_gives_the_true_length(data_dir, tmp_path):
    seen: list[tuple[float, float]] = []

    async def progress(done: float, total: float) -> None:
        seen.append((done, total))

    _, extracted = await extract(data_dir / "talk_tts.mp4", tmp_path, Settings(), progress)
    assert seen[0][1] == pytest.approx(70.0, abs=1)  # the container's (its video is longer)
    assert seen[-1][0] == seen[-1][1] == pytest.approx(extracted.duration, abs=0.001)
    assert extracted.duration == pytest.approx(65.0, abs=0.1)


async def test_a_bomb_is_refused_before_decoding(media, tmp_path):
    started = time.monotonic()
    with pytest.raises(errors.MediaTooLong, match="10.0 h of media is over the 6.0 h limit"):
        await extract(media["bomb"], tmp_path, Settings())
    assert time.monotonic() - started < 5
    assert not list((tmp_path / "store" / "jobs" / "j").glob("*audio*"))


async def test_an_undeclared_stream_is_cut_just_past_the_limit(media, tmp_path):
    seen: list[tuple[float, float]] = []

    async def progress(done: float, total: float) -> None:
        seen.append((done, total))

    with pytest.raises(errors.MediaTooLong) as info:
        await extract(media["stream"], tmp_path, Settings(max_duration=30), progress)
    assert str(info.value) == "stream.flac: it decodes to more audio than the 30 s limit (VTP_MAX_DURATION)"
    assert seen[-1][0] == pytest.approx(31.0, abs=0.1) and seen[-1][1] == 0.0  # cut at limit + 1 s; length unknown
    assert not list((tmp_path / "store" / "jobs" / "j").glob("*audio*"))  # no half artifact left


async def test_a_failing_progress_sink_stops_ffmpeg(media, tmp_path):
    async def progress(done: float, total: float) -> None:
        if done > 0:
            raise errors.JobCancelled("job j was cancelled")

    with pytest.raises(errors.JobCancelled):
        await extract(media["bomb"], tmp_path, Settings(max_duration=0), progress)


async def test_local_runner_reports_extraction(engines, data_dir, tmp_path):
    events: list[ProgressEvent] = []
    runner = LocalRunner(Settings(), engines)
    await runner.run(data_dir / "jfk.flac", TranscribeOptions(formats=("txt",)), tmp_path, on_progress=events.append)
    extracting = [e for e in events if e.state == "extracting"]
    assert extracting[0].audio_done == 0 and extracting[-1].audio_done == pytest.approx(11.0, abs=0.1)
    assert all(e.audio_total == pytest.approx(11.0, abs=0.1) for e in extracting)
    assert events[len(extracting)].state == "segmenting"


# -- the command line -------------------------------------------------------------------------


def test_transcribe_refuses_a_bomb_at_once(media, data_dir, tmp_path):
    started = time.monotonic()
    res = vtp("transcribe", media["bomb"], data_dir / "jfk.flac", "-q", "--formats", "txt", "-o", tmp_path)
    assert res.returncode == 1
    assert res.stderr.splitlines() == [f"vtp: error: {BOMB_REASON}"]  # one line, no traceback
    assert [p.name for p in tmp_path.iterdir()] == ["jfk.txt"]  # the good file is still transcribed
    assert time.monotonic() - started < 60


def test_transcribe_refuses_an_undeclared_stream_past_the_limit(media, tmp_path):
    res = vtp("transcribe", media["stream"], "-q", "-o", tmp_path, env={"VTP_MAX_DURATION": "60"})
    assert res.returncode == 1
    assert res.stderr.splitlines() == ["vtp: error: stream.flac: it decodes to more audio than the 60 s limit (VTP_MAX_DURATION)"]
    assert not any(tmp_path.iterdir())


def test_transcribe_progress_bar_moves_while_extracting(data_dir, tmp_path):
    res = vtp("transcribe", data_dir / "jfk.flac", "--formats", "txt", "-o", tmp_path)
    assert res.returncode == 0, res.stderr
    assert "[extracting]" in res.stderr and "11/11 s audio" in res.stderr


def test_submit_refuses_a_bomb_before_uploading(redis_url, media, tmp_path):
    data = tmp_path / "data"
    env = {"REDIS_URL": redis_url, "VTP_DATA_DIR": str(data)}
    started = time.monotonic()
    res = vtp("submit", "-q", media["bomb"], env=env)
    assert res.returncode == 1
    assert res.stderr.splitlines() == [f"vtp: error: {BOMB_REASON}"]
    assert time.monotonic() - started < 30
    assert not (data / "jobs").exists()  # nothing uploaded

    async def no_jobs() -> list[str]:
        store = JobStore.open(redis_url)
        try:
            return await store.list_ids()
        finally:
            await store.aclose()

    assert anyio.run(no_jobs) == []


# -- the distributed path -------------------------------------------------------------------------


def test_a_job_past_submit_fails_in_extract_and_long_stages_report_progress(redis_server_factory, media, tmp_path):
    """Submitted with no limit (as an older or misconfigured submitter would), the CPU worker's
    own limit still holds: the job fails with the one-line reason. A silent file within the limit
    runs to ``done`` on a CPU worker alone (no speech: nothing to transcribe) and its event
    stream shows the progress of extraction and segmentation."""
    server = redis_server_factory()
    c = Cluster(server.url, tmp_path / "cluster")
    try:
        c.start_worker("cpu", "long-cpu", VTP_MAX_DURATION="60")
        c.wait_ready(("long-cpu", "cpu"))
        res = c.cli("submit", "-q", "--no-reuse", *map(str, (media["bomb"], media["stream"], media["quiet"])), VTP_MAX_DURATION="0")
        assert res.returncode == 0, res.stderr
        ids = res.stdout.split()
        res = c.cli("submit", "-q", "--wait", str(media["stream"]), "--no-reuse", VTP_MAX_DURATION="0")
        assert res.returncode == 1
        assert res.stderr.splitlines() == [
            "vtp: error: stream.flac: it decodes to more audio than the 60 s limit (VTP_MAX_DURATION)"
        ], res.stderr + c.logs()

        async def check() -> None:
            store = JobStore.open(server.url)
            try:
                with anyio.fail_after(60):
                    bomb, stream, quiet = [await store.wait(i) for i in ids]
                assert bomb.state == "failed" and bomb.error == "bomb.flac: 10.0 h of media is over the 60 s limit (VTP_MAX_DURATION)"
                assert stream.state == "failed" and "decodes to more audio than the 60 s limit" in stream.error
                assert quiet.state == "done", quiet.error + c.logs()
                events = [(e.state, e.audio_done, e.audio_total) async for e in store.events(quiet.id)]
                assert ("extracting", 0.0, 50.0) in events and ("extracting", 50.0, 50.0) in events, events
                assert ("segmenting", 50.0, 50.0) in events, events
            finally:
                await store.aclose()

        anyio.run(check)
    finally:
        c.close()


def test_progress_bar_counts_audio_then_speech(capsys):
    """The events of a distributed job as `submit --wait` sees them, including a header that
    understated the length (more done than declared) and states that bring no count."""
    from app.progress import ProgressBar

    bar = ProgressBar("talk.mp4")
    for state, done, total in [
        ("queued", 0, 0), ("extracting", 0, 0), ("extracting", 0, 60), ("extracting", 65, 60), ("extracting", 0, 0),
        ("segmenting", 0, 0), ("segmenting", 30, 65), ("segmenting", 65, 65), ("transcribing", 0, 40),
        ("transcribing", 20, 40), ("merging", 20, 40), ("rendering", 20, 40), ("done", 40, 40),
    ]:
        bar(ProgressEvent(job_id="j", state=state, audio_done=done, audio_total=total))
    bar.close()
    shown = capsys.readouterr().err.replace("\r", "\n")
    assert "talk.mp4 [extracting] 100%" in shown and "65/65 s audio" in shown
    assert "30/65 s audio" in shown and "20/40 s speech" in shown
    assert "talk.mp4 [merging]  50%" in shown and "talk.mp4 [done] 100%" in shown
