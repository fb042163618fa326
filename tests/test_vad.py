"""Chunking on real audio: never past Whisper's window, ordered, disjoint, silence skipped."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from app.messages import WHISPER_WINDOW_S
from workers import audio, spans, vad


def load(path) -> np.ndarray:
    cmd = [audio.ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-ac", "1", "-ar", "16000", "-f", "s16le", "-"]
    return audio.pcm_to_float(subprocess.run(cmd, check=True, capture_output=True).stdout)


@pytest.fixture(scope="module")
def ivr(data_dir):
    return load(data_dir / "ivr_prompts.mp4")


def test_chunks_fit_the_window_and_do_not_overlap(ivr):
    chunks = vad.find_chunks(ivr)
    assert len(chunks) >= 6
    duration = ivr.size / 16000
    for prev, cur in zip(chunks, chunks[1:]):
        assert prev.end <= cur.start
    for i, c in enumerate(chunks):
        assert c.index == i
        assert 0 <= c.start < c.end <= duration
        assert c.duration < WHISPER_WINDOW_S


def test_continuous_speech_longer_than_a_window_is_cut(ivr):
    # Glue the prompts together with no pauses: VAD must still cut below 30 s.
    opts = vad.ChunkingOptions()
    regions = vad.speech_regions(ivr, opts)
    glued = np.concatenate([ivr[s:e] for s, e in regions])
    for c in vad.find_chunks(glued, opts):
        assert c.duration <= opts.max_chunk_s + 1e-6


def test_pathological_region_is_split_hard():
    opts = vad.ChunkingOptions()
    limit = int(opts.max_chunk_s * 16000)
    chunks = vad.chunk_regions([(0, 3 * limit + 5)], opts)  # as if the VAD returned one huge region
    assert all(c.duration <= opts.max_chunk_s + 1e-6 for c in chunks)


def test_silence_has_no_chunks(data_dir):
    assert vad.find_chunks(load(data_dir / "silence.mp4")) == []
    assert vad.find_chunks(np.zeros(0, dtype=np.float32)) == []


def test_long_pauses_are_cut_out_of_the_chunk():
    opts = vad.ChunkingOptions(cut_pause_s=1.0)
    sr = 16000
    (chunk,) = vad.chunk_regions([(0, 2 * sr), (10 * sr, 12 * sr), (13 * sr, 14 * sr)], opts)
    assert (chunk.start, chunk.end) == (0.0, 14.0)
    assert chunk.pieces == [(0.0, 2.0), (10.0, 14.0)]  # the 8 s pause is cut, the 1 s one kept
    assert chunk.speech == [(0.0, 2.0), (10.0, 12.0), (13.0, 14.0)]
    assert chunk.duration == 6.0 and chunk.samples == 6 * sr
    assert chunk.sample_ranges == [(0, 2 * sr), (10 * sr, 14 * sr)]
    # times in the joined audio <-> times in the source
    assert [chunk.to_source(t) for t in (0.0, 1.5, 2.0, 2.5, 6.0)] == [0.0, 1.5, 2.0, 10.5, 14.0]
    assert [chunk.to_heard(t) for t in (1.5, 5.0, 10.5, 14.0)] == [1.5, 2.0, 2.5, 6.0]
    assert chunk.span_around(10.2, 11.0) == (10.0, 14.0)


def test_packing_counts_heard_seconds_not_the_cut_pauses():
    opts = vad.ChunkingOptions()
    sr = 16000
    # four 10 s regions a minute apart: 40 s heard, so two chunks (not four, as before cutting)
    chunks = vad.chunk_regions([(k * 60 * sr, (k * 60 + 10) * sr) for k in range(4)], opts)
    assert [len(c.spans) for c in chunks] == [2, 2]
    assert all(c.duration <= opts.max_chunk_s for c in chunks)


def _seconds(regions) -> float:
    return sum(e - s for s, e in regions) / 16000


def test_blocks_find_what_one_pass_finds(ivr):
    """Streaming in one-minute blocks (memory flat in the length) finds the speech one pass does."""
    one = vad.scan(*vad.array_reader(ivr), vad.ChunkingOptions(block_s=10_000)).regions
    blocks = vad.scan(*vad.array_reader(ivr), vad.ChunkingOptions(block_s=60)).regions
    assert abs(_seconds(one) - _seconds(blocks)) < 0.02 * _seconds(one)
    assert abs(len(one) - len(blocks)) <= 2
    for prev, cur in zip(blocks, blocks[1:]):
        assert prev[1] <= cur[0]  # ordered and disjoint across block boundaries


def test_pcm_file_and_array_give_the_same_chunks(ivr, tmp_path):
    path = tmp_path / "audio.pcm"
    (np.clip(ivr, -1, 1) * 32768).clip(-32768, 32767).astype("<i2").tofile(path)
    opts = vad.ChunkingOptions()
    from_file = vad.plan_chunks(vad.scan(*vad.pcm_reader(path), opts), opts)
    assert [(round(c.start, 2), round(c.end, 2)) for c in from_file] == [
        (round(c.start, 2), round(c.end, 2)) for c in vad.find_chunks(ivr, opts)
    ]


def test_a_low_voice_after_a_silence_keeps_its_first_words(data_dir):
    """The high-passed copy alone heard JFK's second "And so my fellow Americans" from "my"
    (0.9 s late) after 20 s of silence; the pass over the original hears it from the start."""
    jfk = load(data_dir / "jfk.flac")
    audio = np.concatenate([jfk, np.zeros(20 * 16000, np.float32), jfk])
    second = (jfk.size + 20 * 16000) / 16000
    regions = vad.speech_regions(audio, vad.ChunkingOptions())
    later = [(s / 16000, e / 16000) for s, e in regions if e / 16000 > second]
    assert later[0][0] <= second + 0.3, later[:2]  # "And" starts 0.3 s in; the pad reaches before it
    assert all(a[1] <= b[0] for a, b in zip(regions, regions[1:]))  # ordered, disjoint
    # the fixture keeps meaning something: the filtered copy alone starts late
    opts = vad.ChunkingOptions()
    filtered = [s / 16000 for s, e in vad._vad(vad.condition(audio, opts), opts) if e / 16000 > second]
    assert filtered[0] > second + 0.6, filtered[:2]


def test_a_paragraph_longer_than_the_window_is_cut_at_a_pause(ivr):
    """Speech with only short pauses (the padding joins them into one region) for over two
    minutes: every chunk ends at one of the VAD's pauses, never mid-word at exactly the window,
    and the chunks are packed full (a paragraph's tail is not left a window of its own)."""
    opts = vad.ChunkingOptions()
    sr = 16000
    pad = int(opts.speech_pad_ms / 1000 * sr)
    pause = np.zeros(int(0.2 * sr), np.float32)
    glued = np.concatenate([p for s, e in vad.speech_regions(ivr, opts) for p in (ivr[s + pad : e - pad], pause)])
    regions = vad.speech_regions(glued, opts)
    assert max(e - s for s, e in spans.merge(regions)) > 2 * opts.max_chunk_s * sr  # one long paragraph
    chunks = vad.find_chunks(glued, opts)
    heard = sum(c.duration for c in chunks)
    assert len(chunks) <= int(np.ceil(heard / (opts.max_chunk_s - 6)))  # full, bar a sentence each
    frame = sr // 50  # 20 ms
    level = lambda t: float(np.sqrt(np.mean(np.square(glued[int(t * sr) - frame : int(t * sr) + frame]))))
    loud = float(np.percentile([level(t) for t in np.arange(1, glued.size / sr - 1, 0.1)], 90))
    for c in chunks[:-1]:
        assert c.duration < opts.max_chunk_s - 0.05, c  # not a hard cut at the limit
        assert level(c.end) < 0.25 * loud, (c.end, level(c.end), loud)  # at a pause


def test_spans_overlap_only_where_they_share_some_length():
    assert spans.overlap((1.0, 3.0), (2.0, 4.0)) and spans.overlap((2.0, 4.0), (1.0, 3.0))
    assert spans.overlap((1.0, 5.0), (2.0, 3.0))  # one inside the other
    assert not spans.overlap((1.0, 2.0), (2.0, 3.0))  # touching
    assert not spans.overlap((1.0, 2.0), (3.0, 4.0))
