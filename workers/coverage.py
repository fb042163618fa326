"""No speech lost: the coverage guarantee of the transcribe stage, for any engine.

Whisper decoding a chunk can stop early: without timestamp tokens it may end the chunk after a
sentence that is followed by a pause and never decode the speech after it (measured: 13 s of
a lecture gone), and it sometimes skips a phrase that repeats its neighbour. Nothing in the
output says so. So after the engine has decoded and word-aligned a batch, every stretch of
the VAD's speech (``Chunk.speech``) that no aligned word covers, at least ``min_gap_s`` long,
is decoded again, with the rest of the VAD's speech region(s) it lies in, as a chunk of its own
— all such stretches of the batch in one engine call — and the words found there are merged in
by time. A word that overlaps a word already there is dropped, so where stretches touch nothing
is said twice. But where the stretch on its own yields more words than the chunk had there (and
Whisper is confident of them), its words replace the chunk's: that is a phrase said twice and
decoded once, whose few words alignment smeared over both. A stretch decoded again can itself
stop early, so this runs up to ``rounds`` times on what is still uncovered.

Probe chunks (``Chunk.probe``: loud audio the VAD rejected, see ``workers.levels``) are kept
only where Whisper is sure it heard speech: its no-speech probability below and its average
log-probability above Whisper's own thresholds. Music and noise stay out.

Everything here uses only ``Engine.transcribe_batch`` and the words on segments, so every
engine gets it unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import msgspec
import numpy as np

from app.messages import SAMPLE_RATE, Chunk, CoverageStats, Segment, TranscribeOptions, Word
from workers import cues
from workers.engines.base import Engine
from workers.spans import merge, subtract


@dataclass(frozen=True)
class CoverageOptions:
    #: Speech without words at least this long is decoded again.
    min_gap_s: float = 1.0
    #: Word edges from alignment are approximate: audio this close to a word counts as covered.
    word_margin_s: float = 0.25
    #: A stretch decoded again starts and ends this far into its neighbours (never past the
    #: chunk), so its first and last words are not clipped.
    context_s: float = 0.2
    #: Passes over what is still uncovered.
    rounds: int = 2
    #: No spoken word lasts longer: a longer one is alignment (DTW) stretching a word across
    #: speech Whisper did not decode (measured: "from" over 6.8 s, spanning a repeated phrase
    #: Whisper heard once). Such a word covers only this much audio, half at each end.
    max_word_s: float = 1.0
    #: Whisper's own rule for "speech was heard", applied strictly to probe chunks.
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0


Span = tuple[float, float]

#: Faster than anyone speaks: a decode with more words a second is Whisper looping.
MAX_WORDS_PER_S = 5.0


def _word_spans(word: Word, longest: float) -> list[Span]:
    if word.end - word.start <= longest:
        return [(word.start, word.end)]
    half = longest / 2
    return [(word.start, word.start + half), (word.end - half, word.end)]


def _covered(segments: list[Segment], margin: float, longest: float = float("inf")) -> list[Span]:
    spans: list[Span] = []
    for seg in segments:
        if seg.words:
            spans.extend((a - margin, b + margin) for w in seg.words for a, b in _word_spans(w, longest))
        else:  # an engine that gave no word timings: the segment covers its whole span
            spans.append((seg.start - margin, seg.end + margin))
    return merge(spans)


def uncovered(speech: list[Span], segments: list[Segment], opts: CoverageOptions) -> list[Span]:
    """Stretches of ``speech`` at least ``min_gap_s`` long that no word covers."""
    covered = _covered(segments, opts.word_margin_s, opts.max_word_s)
    return [(s, e) for s, e in subtract(speech, covered) if e - s >= opts.min_gap_s]


def probe_heard_speech(segments: list[Segment], opts: CoverageOptions) -> bool:
    """Whisper is sure: low no-speech probability *and* a confident decode (both, not either)."""
    return bool(segments) and all(
        s.no_speech_prob < opts.no_speech_threshold and s.avg_logprob > opts.logprob_threshold for s in segments
    )


def _overlaps(word: Word, existing: list[Span]) -> bool:
    middle = (word.start + word.end) / 2
    return any(start <= middle <= end for start, end in existing)


def _words(segments: list[Segment]) -> list[Word]:
    return [w for s in segments for w in s.words or []]


def _middle(word: Word) -> float:
    return (word.start + word.end) / 2


def _confident(segments: list[Segment], words: list[Word], span: Span, opts: CoverageOptions) -> bool:
    """A decode to trust over the chunk's: confident by Whisper's own rule, and no faster than
    anyone speaks (a decoding loop repeats words far faster than 5 a second)."""
    confident = all(s.avg_logprob > opts.logprob_threshold for s in segments)
    return confident and len(words) <= MAX_WORDS_PER_S * max(span[1] - span[0], 1.0)


def _without(segments: list[Segment], span: Span) -> list[Segment]:
    """The segments with their words inside ``span`` taken out (text and times follow the words)."""
    out: list[Segment] = []
    for seg in segments:
        if not seg.words:
            out.append(seg)
            continue
        before = [w for w in seg.words if _middle(w) < span[0]]
        after = [w for w in seg.words if _middle(w) > span[1]]
        if len(before) + len(after) == len(seg.words) and not (before and after):
            out.append(seg)
            continue
        # split where the words were taken out, so the new ones fall between in time order
        for kept in (before, after):
            if kept:
                text = "".join(w.word for w in kept).strip()
                out.append(msgspec.structs.replace(seg, words=kept, text=text, start=kept[0].start, end=kept[-1].end))
    return out


def transcribe_covered(
    engine: Engine,
    audio: list[np.ndarray],
    chunks: list[Chunk],
    options: TranscribeOptions,
    opts: CoverageOptions | None = None,
) -> tuple[list[Segment], str, CoverageStats]:
    """``engine.transcribe_batch`` with the coverage guarantee; segments in chunk, time order."""
    opts = opts or CoverageOptions()
    aligned = msgspec.structs.replace(options, word_timestamps=True)  # coverage needs the words
    segments, language = engine.transcribe_batch(audio, chunks, aligned)
    by_chunk: dict[int, list[Segment]] = defaultdict(list)
    for seg in segments:
        by_chunk[seg.chunk].append(seg)

    probes = [c for c in chunks if c.probe]
    rescued = [c for c in probes if probe_heard_speech(by_chunk.get(c.index, []), opts)]
    for c in probes:
        if c not in rescued:
            by_chunk.pop(c.index, None)
    repairs = repair_gaps(engine, audio, chunks, by_chunk, aligned, opts)

    out: list[Segment] = []
    for c in chunks:
        for seg in sorted(by_chunk.get(c.index, []), key=lambda s: (s.start, s.end)):
            out.append(seg if options.word_timestamps else msgspec.structs.replace(seg, words=None))
    stats = msgspec.structs.replace(
        repairs, probes=len(probes), rescued=len(rescued), rescued_seconds=round(sum(c.duration for c in rescued), 3)
    )
    return out, language, stats


def repair_gaps(
    engine: Engine,
    audio: list[np.ndarray],
    chunks: list[Chunk],
    by_chunk: dict[int, list[Segment]],
    options: TranscribeOptions,
    opts: CoverageOptions,
) -> CoverageStats:
    """Decode again what no word covers, and merge the new words into ``by_chunk`` (chunk index
    -> segments, with words), in place."""
    gaps, repaired, repaired_seconds = 0, 0, 0.0
    tried: set[tuple[int, float, float]] = set()
    for _ in range(opts.rounds):
        todo: list[tuple[int, Span, Span, Span]] = []  # (position in batch, gap, its speech, stretch decoded)
        for i, c in enumerate(chunks):
            if c.probe:
                continue
            for gap in uncovered(c.speech or [(c.start, c.end)], by_chunk.get(c.index, []), opts):
                key = (c.index, round(gap[0], 2), round(gap[1], 2))
                if key not in tried:
                    tried.add(key)
                    # the whole of the VAD's speech around the gap: where Whisper merged a phrase
                    # said twice, the words beside the gap are mistimed too; within the gap's own
                    # piece of the chunk, with context: never across a cut pause
                    around = [r for r in c.speech or [(c.start, c.end)] if r[0] < gap[1] and r[1] > gap[0]] or [gap]
                    low, high = c.span_around(*gap)
                    region = (max(low, min(r[0] for r in around)), min(high, max(r[1] for r in around)))
                    stretch = (max(low, region[0] - opts.context_s), min(high, region[1] + opts.context_s))
                    todo.append((i, gap, region, stretch))
        if not todo:
            break
        gaps += len(todo)
        pieces, subs = [], []
        for k, (i, _gap, _region, (start, end)) in enumerate(todo):
            c = chunks[i]
            pieces.append(audio[i][round(c.to_heard(start) * SAMPLE_RATE) : round(c.to_heard(end) * SAMPLE_RATE)])
            subs.append(Chunk(index=k, start=start, end=end))
        found: dict[int, list[Segment]] = defaultdict(list)
        for seg in engine.transcribe_batch(pieces, subs, options)[0]:
            found[seg.chunk].append(seg)
        for k, (i, (g_start, g_end), region, (start, end)) in enumerate(todo):
            parent = chunks[i]
            segments = by_chunk.get(parent.index, [])
            heard = _words(found.get(k, []))
            before = [w for w in _words(segments) if region[0] <= _middle(w) <= region[1]]
            again = [w for w in heard if region[0] <= _middle(w) <= region[1]]
            if heard and len(again) > len(before) and _confident(found[k], again, region, opts):
                # The stretch on its own says more than the chunk did: its words replace the
                # chunk's there (a phrase said twice and decoded once, its words smeared).
                by_chunk[parent.index] = segments = _without(segments, region)
                fresh = again
            else:
                existing = _covered(segments, 0.0, opts.max_word_s)
                fresh = [w for w in heard if not _overlaps(w, existing)]
            if not fresh:
                continue
            first = found[k][0]
            by_chunk.setdefault(parent.index, []).extend(
                cues.split_into_cues(
                    Chunk(index=parent.index, start=start, end=end),
                    "",
                    fresh,
                    keep_words=True,
                    avg_logprob=first.avg_logprob,
                    no_speech_prob=first.no_speech_prob,
                )
            )
            repaired += 1
            repaired_seconds += g_end - g_start
    return CoverageStats(gaps=gaps, repaired=repaired, repaired_seconds=round(repaired_seconds, 3))
