"""extract_audio on real media: every container we promise, and every kind of bad input."""

from __future__ import annotations

import pytest

from app import errors
from app.config import Settings
from app.messages import ExtractRequest
from app.storage import LocalStorage
from tests.support.media import FORMATS, make_variant
from workers import audio, stages

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def variants(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    return {ext: make_variant(data_dir / "jfk.flac", out / f"jfk.{ext}") for ext in FORMATS}


def put(path, data: bytes):
    path.write_bytes(data)
    return path


async def extract(path, tmp_path, **settings):
    audio.check_input_file(path)  # as the local runner and `vtp submit` do before storing
    storage = LocalStorage(tmp_path / "store")
    storage.adopt("jobs/t/media", path)
    ctx = stages.StageContext(storage=storage, settings=Settings.from_env(data_dir=str(tmp_path), **settings))
    result = await stages.extract_audio(ctx, ExtractRequest(job_id="t", media_key="jobs/t/media", source_name=path.name))
    return result, storage


@pytest.mark.parametrize("ext", sorted(FORMATS))
async def test_every_promised_container(ext, variants, tmp_path):
    result, storage = await extract(variants[ext], tmp_path)
    assert 5.5 <= result.duration <= 6.5
    pcm = await storage.get_bytes(result.audio_key)
    assert len(pcm) == round(result.duration * 16000) * 2
    samples = audio.pcm_to_float(pcm)
    assert samples.std() > 0.01  # real speech came through, not silence


async def test_video_with_speech(data_dir, tmp_path):
    result, _ = await extract(data_dir / "talk_tts.mp4", tmp_path)
    assert 60 < result.duration < 72


async def test_silent_track_is_audio_not_an_error(data_dir, tmp_path):
    result, _ = await extract(data_dir / "silence.mp4", tmp_path)
    assert result.duration == pytest.approx(15, abs=0.5)


@pytest.mark.parametrize(
    "make, kind, words",
    [
        (lambda d, t: d / "no_audio.mp4", errors.NoAudioStream, "no audio stream"),
        (lambda d, t: put(t / "empty.mp4", b""), errors.EmptyMedia, "empty"),
        (lambda d, t: put(t / "noise.mp4", bytes(range(256)) * 40), errors.CorruptMedia, "MP4"),
        (lambda d, t: put(t / "cut.mp4", (d / "talk_tts.mp4").read_bytes()[:200_000]), errors.CorruptMedia, "truncated"),
        (lambda d, t: put(t / "notes.txt", b"hello, not a video\n" * 50), errors.CorruptMedia, "ffmpeg"),
        (lambda d, t: t / "missing.mp4", errors.InputNotFound, "not found"),
        (lambda d, t: t, errors.InputNotFound, "directory"),
    ],
    ids=["no-audio", "empty", "random-bytes", "truncated", "text-file", "missing", "directory"],
)
async def test_bad_input_has_a_clear_reason(make, kind, words, data_dir, tmp_path):
    path = make(data_dir, tmp_path)
    with pytest.raises(kind) as info:
        await extract(path, tmp_path / "w")
    message = str(info.value)
    assert words.lower() in message.lower()
    assert "\n" not in message and "Traceback" not in message
    assert info.value.permanent


async def test_playlists_that_point_elsewhere_are_refused(data_dir, tmp_path):
    playlist = tmp_path / "video.mp4"  # a playlist wearing a video's name
    playlist.write_text(f"#EXTM3U\n#EXTINF:10,\nfile:{data_dir / 'talk_tts.mp4'}\n#EXT-X-ENDLIST\n")
    concat = tmp_path / "talk.mkv"
    concat.write_text(f"ffconcat version 1.0\nfile {data_dir / 'jfk.flac'}\n")
    for path in (playlist, concat):
        with pytest.raises(errors.InputError):
            await extract(path, tmp_path / path.stem)


async def test_hostile_file_names_are_read_as_files(data_dir, tmp_path):
    for name in ("-i.mp4", "http:x.flac", "concat:a|b.flac", "sp ace;$(id).flac"):
        path = tmp_path / name
        path.write_bytes((data_dir / "jfk.flac").read_bytes())
        result, _ = await extract(path, tmp_path / f"w{len(name)}")
        assert result.duration == pytest.approx(11, abs=0.5)


async def test_oversized_input_is_refused_before_decoding(data_dir, tmp_path):
    big = put(tmp_path / "big.mp4", (data_dir / "talk_tts.mp4").read_bytes() * 3)  # 1.5 MB
    with pytest.raises(errors.MediaTooLarge, match="limit"):
        await extract(big, tmp_path, max_input_mb=1)


async def test_ffmpeg_timeout_is_a_transient_error(data_dir, tmp_path):
    """A busy host is no reason to call the media broken: the distributed runner retries it."""
    with pytest.raises(errors.ResourceError, match="within") as caught:
        await extract(data_dir / "ivr_prompts.mp4", tmp_path, ffmpeg_timeout=0.001)
    assert not caught.value.permanent


def test_ffmpeg_comes_from_the_wheel_or_env(monkeypatch):
    audio.ffmpeg_exe.cache_clear()
    monkeypatch.setenv("VTP_FFMPEG", "/opt/custom/ffmpeg")
    assert audio.ffmpeg_exe() == "/opt/custom/ffmpeg"
    audio.ffmpeg_exe.cache_clear()
    monkeypatch.delenv("VTP_FFMPEG")
    assert "imageio_ffmpeg" in audio.ffmpeg_exe()
    audio.ffmpeg_exe.cache_clear()
