"""A chunk's text and word timings -> subtitle-sized segments.

Cues break after a sentence ends, at a pause, or before they grow past what a viewer can
read (about two lines of 42 characters, 7 seconds). Without word timings (alignment found
none) the chunk becomes one segment spanning the chunk.
"""

from __future__ import annotations

from app.messages import Chunk, Segment, Word

MAX_CUE_CHARS = 84
MAX_CUE_SECONDS = 7.0
MIN_CUE_SECONDS = 1.0
PAUSE_SECONDS = 0.6
SENTENCE_END = (".", "?", "!", "。", "？", "！")


def split_into_cues(
    chunk: Chunk,
    text: str,
    words: list[Word],
    *,
    keep_words: bool,
    avg_logprob: float = 0.0,
    no_speech_prob: float = 0.0,
) -> list[Segment]:
    def segment(start: float, end: float, body: str, group: list[Word] | None) -> Segment:
        return Segment(
            start=start,
            end=max(end, start),
            text=body.strip(),
            words=group if keep_words else None,
            chunk=chunk.index,
            avg_logprob=round(avg_logprob, 4),
            no_speech_prob=round(no_speech_prob, 4),
        )

    words = [w for w in words if w.word.strip()]
    if not words:
        return [segment(chunk.start, chunk.end, text, None)] if text.strip() else []
    return [segment(g[0].start, g[-1].end, "".join(w.word for w in g), g) for g in cue_groups(words)]


def _chars(words: list[Word]) -> int:
    return len("".join(w.word for w in words).strip())


def _sentences(words: list[Word]) -> list[list[Word]]:
    """Break after a sentence ends (once a cue has some length) and at every pause."""
    groups: list[list[Word]] = [[words[0]]]
    for prev, word in zip(words, words[1:]):
        group = groups[-1]
        ended = prev.word.strip().endswith(SENTENCE_END) and prev.end - group[0].start >= MIN_CUE_SECONDS
        if ended or word.start - prev.end >= PAUSE_SECONDS:
            groups.append([])
        groups[-1].append(word)
    return groups


def _balanced(words: list[Word]) -> list[list[Word]]:
    """Split a too-long sentence near its middle, preferring a clause boundary (comma...)."""
    if len(words) < 2 or (_chars(words) <= MAX_CUE_CHARS and words[-1].end - words[0].start <= MAX_CUE_SECONDS):
        return [words]
    total = _chars(words)

    def cost(i: int) -> float:
        imbalance = abs(_chars(words[:i]) - total / 2) / total
        clause = 0.2 if words[i - 1].word.strip().endswith((",", ";", ":")) else 0.0
        return imbalance - clause

    cut = min(range(1, len(words)), key=cost)
    return _balanced(words[:cut]) + _balanced(words[cut:])


def cue_groups(words: list[Word]) -> list[list[Word]]:
    return [piece for sentence in _sentences(words) for piece in _balanced(sentence)]
