"""The whole local pipeline on real speech with the real bundled model.

WER bounds were set from what this pipeline measures on these files (docs/benchmarks.md),
with a small margin. Beyond wrong words, the tests look for speech that goes *missing*:
deletions, a reference line with no counterpart, a chunk past Whisper's 30 s window.
"""

from __future__ import annotations

import re

import anyio
import pytest

from app.config import Settings
from app.messages import TranscribeOptions
from tests.support.wer import word_errors
from workers.local_runner import LocalRunner

# file -> (max WER, max deletion rate), measured: talk_tts 3.4%, ivr_prompts 2.4%, jfk 0%
BOUNDS = {
    "talk_tts.mp4": (0.06, 0.03),
    "ivr_prompts.mp4": (0.05, 0.03),
    "jfk.flac": (0.05, 0.02),
}


@pytest.fixture(scope="module")
def runner(engines, tmp_path_factory):
    return LocalRunner(Settings.from_env(data_dir=str(tmp_path_factory.mktemp("data"))), engines=engines)


def run(runner, path, out, **options):
    return anyio.run(lambda: runner.run(path, TranscribeOptions(**options), out))


@pytest.fixture(scope="module")
def results(runner, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return {name: run(runner, data_dir / name, out) for name in BOUNDS}


def reference(data_dir, name: str) -> str:
    return (data_dir / (name.rsplit(".", 1)[0] + ".ref.txt")).read_text()


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_accuracy_on_real_speech(name, results, data_dir):
    max_wer, max_deleted = BOUNDS[name]
    measured = word_errors(reference(data_dir, name), results[name].transcript.text)
    n_ref = measured.hits + measured.substitutions + measured.deletions
    assert measured.wer <= max_wer, f"WER {measured.wer:.3f} on {name}"
    assert measured.deletions / n_ref <= max_deleted, f"{measured.deletions} of {n_ref} words missing on {name}"


def test_no_prompt_goes_missing(results, data_dir):
    """ivr_prompts: 43 separate prompts; each must be (mostly) heard, wherever chunks were cut."""
    from tests.support.wer import normalize

    hypothesis = set(normalize(results["ivr_prompts.mp4"].transcript.text).split())
    lines = [line for line in reference(data_dir, "ivr_prompts.mp4").splitlines() if line.strip()]
    missing = []
    for line in lines:
        words = normalize(line).split()
        if sum(w in hypothesis for w in words) < 0.6 * len(words):
            missing.append(line)
    assert not missing, f"prompts not transcribed: {missing}"


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_timestamps_are_ordered_and_inside_the_audio(name, results):
    transcript = results[name].transcript
    previous_start = 0.0
    assert transcript.segments
    for seg in transcript.segments:
        assert 0.0 <= seg.start <= seg.end <= transcript.duration + 1e-6
        assert seg.start >= previous_start
        previous_start = seg.start
        assert seg.text.strip()


def test_segments_are_subtitle_sized(results):
    for result in results.values():
        for seg in result.transcript.segments:
            assert seg.end - seg.start <= 10.0
            assert len(seg.text) <= 120


def test_outputs_written_and_stats_filled(results):
    result = results["talk_tts.mp4"]
    assert set(result.outputs) == {"txt", "srt", "vtt", "json"}
    for path in result.outputs.values():
        assert path.stat().st_size > 0
    stats = result.transcript.stats
    assert stats.wall_seconds > 0 and stats.realtime_factor > 1
    assert set(stats.stages) >= {"extract", "segment", "transcribe", "merge"}
    assert stats.chunks >= 3  # 65 s of speech cannot fit fewer 30 s windows


def test_silence_gives_an_empty_transcript(runner, data_dir, tmp_path):
    result = run(runner, data_dir / "silence.mp4", tmp_path)
    assert result.transcript.segments == []
    assert result.transcript.text == ""
    assert result.outputs["txt"].read_text() == ""
    assert result.outputs["srt"].read_text() == ""
    assert result.outputs["vtt"].read_text().strip() == "WEBVTT"


def test_word_timestamps_are_inside_their_segment(runner, data_dir, tmp_path):
    result = run(runner, data_dir / "jfk.flac", tmp_path, word_timestamps=True, formats=("json",))
    words = [w for seg in result.transcript.segments for w in seg.words or []]
    assert len(words) >= 20
    for seg in result.transcript.segments:
        assert seg.words
        for w in seg.words:
            assert seg.start - 1e-6 <= w.start <= w.end <= seg.end + 1e-6
    assert re.search(r"\bcountry\b", " ".join(w.word for w in words).lower())


def test_words_omitted_unless_asked(results):
    assert all(seg.words is None for seg in results["jfk.flac"].transcript.segments)


def test_batch_size_does_not_change_the_words(runner, data_dir, tmp_path, results):
    one = run(runner, data_dir / "talk_tts.mp4", tmp_path, batch_size=1, formats=("txt",))
    assert one.transcript.text == results["talk_tts.mp4"].transcript.text
