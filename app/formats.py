"""Transcript -> TXT, SRT, VTT and JSON bytes.

Shared by the render stage and the web process. SRT follows the de-facto SubRip format
(1-based counter, ``HH:MM:SS,mmm``, no blank line inside a cue); VTT follows the W3C WebVTT
spec (``WEBVTT`` header, ``HH:MM:SS.mmm``, ``&``/``<``/``>`` escaped, no ``-->`` in a payload).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from app.messages import Segment, Transcript


def _clock(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _cue_text(segment: Segment) -> str:
    # Blank lines would end a cue early in both SRT and VTT; "-->" would start a new timing line.
    lines = [line.strip() for line in segment.text.replace("-->", "->").splitlines()]
    return "\n".join(line for line in lines if line)


def _cues(transcript: Transcript) -> list[tuple[Segment, str]]:
    return [(s, text) for s in transcript.segments if (text := _cue_text(s))]


def to_txt(transcript: Transcript) -> bytes:
    lines = [text.replace("\n", " ") for _s, text in _cues(transcript)]
    return ("\n".join(lines) + "\n" if lines else "").encode()


def to_srt(transcript: Transcript) -> bytes:
    blocks = [
        f"{i}\n{_clock(s.start, ',')} --> {_clock(max(s.end, s.start + 0.001), ',')}\n{text}\n"
        for i, (s, text) in enumerate(_cues(transcript), start=1)
    ]
    return "\n".join(blocks).encode()


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(transcript: Transcript) -> bytes:
    blocks = ["WEBVTT\n"]
    blocks += [
        f"{_clock(s.start, '.')} --> {_clock(max(s.end, s.start + 0.001), '.')}\n{_vtt_escape(text)}\n"
        for s, text in _cues(transcript)
    ]
    return "\n".join(blocks).encode()


class _JsonSegment(msgspec.Struct, omit_defaults=True):
    id: int
    start: float
    end: float
    text: str
    words: list | None = None


class _JsonTranscript(msgspec.Struct):
    text: str
    #: The language spoken (the source language when translating).
    language: str
    #: ``transcribe``, or ``translate``: ``text`` is English.
    task: str
    duration: float
    segments: list[_JsonSegment]
    stats: object
    #: Where the VAD heard speech, and the part of it no word covers (``[start, end]`` seconds).
    speech: list = []
    unheard: list = []


def to_json(transcript: Transcript) -> bytes:
    doc = _JsonTranscript(
        text=transcript.text,
        language=transcript.language,
        task=transcript.task,
        duration=round(transcript.duration, 3),
        segments=[
            _JsonSegment(id=i, start=s.start, end=s.end, text=s.text.strip(), words=s.words)
            for i, s in enumerate(transcript.segments)
        ],
        stats=transcript.stats,
        speech=[[round(a, 3), round(b, 3)] for a, b in transcript.speech],
        unheard=[[round(a, 3), round(b, 3)] for a, b in transcript.unheard],
    )
    return msgspec.json.format(msgspec.json.encode(doc), indent=2) + b"\n"


RENDERERS: dict[str, Callable[[Transcript], bytes]] = {
    "txt": to_txt,
    "srt": to_srt,
    "vtt": to_vtt,
    "json": to_json,
}

MEDIA_TYPES = {
    "txt": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "json": "application/json",
}
