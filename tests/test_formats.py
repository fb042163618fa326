"""Rendered outputs parse back with independent libraries (srt, webvtt-py, msgspec)."""

from __future__ import annotations

import io

import msgspec
import srt
import webvtt

from app import formats
from app.messages import Segment, Transcript, TranscriptStats, Word


def transcript(*segments: Segment) -> Transcript:
    return Transcript(
        language="en",
        duration=3725.5,
        segments=list(segments),
        stats=TranscriptStats(engine="ctranslate2", model="tiny.en", chunks=1, speech_seconds=10.0),
    )


TRICKY = transcript(
    Segment(start=0.0, end=1.5, text=" Hello <b>world</b> & friends"),
    Segment(start=1.5, end=1.5, text="zero length"),
    Segment(start=2.0, end=4.25, text="line one\n\nline two --> not a timing"),
    Segment(start=3599.999, end=3725.4, text="past the hour", words=[Word(start=3600.0, end=3600.5, word=" past", probability=0.9)]),
    Segment(start=3725.4, end=3725.5, text="   "),
)


def test_srt_parses_back():
    cues = list(srt.parse(formats.to_srt(TRICKY).decode()))
    assert [c.index for c in cues] == [1, 2, 3, 4]
    assert cues[0].content == "Hello <b>world</b> & friends"
    assert cues[1].end > cues[1].start
    assert cues[2].content == "line one\nline two -> not a timing"
    assert cues[3].start.total_seconds() == 3599.999
    assert cues[3].end.total_seconds() == 3725.4


def test_vtt_parses_back_and_escapes():
    text = formats.to_vtt(TRICKY).decode()
    assert text.startswith("WEBVTT\n\n")
    captions = webvtt.from_buffer(io.StringIO(text)).captions
    assert len(captions) == 4
    assert captions[0].raw_text == "Hello &lt;b&gt;world&lt;/b&gt; &amp; friends"
    assert captions[3].start == "00:59:59.999"
    assert captions[3].end == "01:02:05.400"


def test_txt_is_one_cue_a_line():
    assert formats.to_txt(TRICKY).decode().splitlines() == [
        "Hello <b>world</b> & friends",
        "zero length",
        "line one line two -> not a timing",
        "past the hour",
    ]


def test_json_has_text_segments_and_stats():
    doc = msgspec.json.decode(formats.to_json(TRICKY))
    assert doc["language"] == "en" and doc["duration"] == 3725.5
    assert doc["text"].startswith("Hello <b>world</b>")
    assert [s["id"] for s in doc["segments"]] == [0, 1, 2, 3, 4]
    assert doc["segments"][3]["words"] == [{"start": 3600.0, "end": 3600.5, "word": " past", "probability": 0.9}]
    assert "words" not in doc["segments"][0]
    assert doc["stats"]["engine"] == "ctranslate2"


def test_empty_transcript_renders_valid_empty_files():
    empty = transcript()
    assert formats.to_txt(empty) == b""
    assert list(srt.parse(formats.to_srt(empty).decode())) == []
    assert webvtt.from_buffer(io.StringIO(formats.to_vtt(empty).decode())).captions == []
    assert msgspec.json.decode(formats.to_json(empty))["segments"] == []
