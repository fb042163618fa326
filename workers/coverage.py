"""No speech lost: the coverage guarantee of the transcribe stage, for any engine.

Whisper decoding a chunk can stop early or say nothing at all: without timestamp tokens tiny.en
ends some 30 s windows of clear speech at once (measured: 0 tokens, where the same window decoded
with timestamps gives 85 words), it may end a chunk after a sentence followed by a pause, it
sometimes skips a phrase that repeats its neighbour, and it can loop. Nothing in the output says
so. A decode that returns little or nothing where the VAD heard speech is a *suspect*, not an
answer, and asking again the same way is not a second opinion. So after the engine has decoded
and word-aligned a batch:

* **Suspects.** Every stretch of the VAD's speech (``Chunk.speech``) that no aligned word covers,
  at least ``min_gap_s`` long (a *gap*, taken with the rest of the VAD speech region(s) it lies
  in); every chunk with far fewer words per second of its speech than the batch's own rate
  (``sparse_ratio``; at least ``min_suspect_s`` of speech), and every VAD region of a chunk
  (speech between pauses) with too few words by the same rule, taken as a gap
  (``_sparse_regions``); every chunk whose text loops (Whisper's compression-ratio check).
* **The ladder.** Each suspect climbs ``LADDER`` until its words are plausible for its speech
  (``plausible``) or the ladder ends. A gap: (0) the stretch alone, decoded as before (a gap's
  context differs from its chunk's); (1) with timestamp tokens, as sequential Whisper decodes;
  (2) a shifted window: a long stretch cut in two near the middle (``_cut``), a short one
  widened by ``shift_s`` of its chunk's audio on each side; (3) Whisper's temperature
  fallback (0.2 .. 1.0, compression-ratio and log-probability checks), kept only where it
  passes them, last because it costs the most. A whole chunk: the shifted window (its two
  halves), then the whole chunk with timestamp tokens (a translation's: the other way round),
  then the fallback. The fallback's first
  temperature repeats the timestamps rung's decode, so only suspects whose decode there failed
  Whisper's checks climb it (``Rung.repeats``): on the rest it would only say the same again.
  Every rung decodes all the batch's suspects still on it in *one* engine call, so nothing
  costs anything where nothing is suspect; each rung's firings are counted in
  ``CoverageStats.rungs``, the suspects it settled in ``settled``. An engine that runs calls
  side by side decodes the next rung beside a rung too small to keep it busy (``climb``).
* **Merging.** The best words a suspect got (most words among acceptable decodes) are merged by
  time: where they say more than the chunk did in that region (and Whisper is confident of them)
  they replace the chunk's words there (a phrase said twice and decoded once, whose few words
  alignment smeared over both; a chunk that ended early); otherwise only words that overlap
  nothing already there are added, so where stretches touch nothing is said twice. A looping
  chunk's words are replaced by any acceptable decode. This runs up to ``rounds`` times on what
  is still uncovered.
* **Honest output.** VAD speech that no rung turned into words is returned as ``unheard`` spans
  (``CoverageStats.unheard_seconds``): where speech may be missing, or where the VAD heard noise.

Probe chunks (``Chunk.probe``: loud audio the VAD rejected, see ``workers.levels``) are kept
only where Whisper is sure it heard speech: its no-speech probability below and its average
log-probability above Whisper's own thresholds. Music and noise stay out; probes never climb
the ladder and never count as unheard.

Everything here uses only ``Engine.transcribe_batch`` (with a ``Decoding`` per rung) and the
words on segments, so every engine gets it unchanged.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import msgspec
import numpy as np

from app.messages import SAMPLE_RATE, Chunk, CoverageStats, Segment, TranscribeOptions, Word
from workers import cues
from workers.engines.base import (
    COMPRESSION_RATIO_THRESHOLD,
    FALLBACK_TEMPERATURES,
    FAST,
    LOGPROB_THRESHOLD,
    NO_SPEECH_THRESHOLD,
    Decoding,
    Engine,
    compression_ratio,
    needs_fallback,
)
from workers.spans import merge, overlap, subtract

Span = tuple[float, float]


@dataclass(frozen=True)
class Rung:
    """One way of asking again."""

    name: str
    decoding: Decoding
    #: ``stretch``: the suspect's stretch as cut; ``shifted``: cut in two (long) or widened (short).
    window: Literal["stretch", "shifted"] = "stretch"
    #: Only decodes that pass Whisper's checks count (a sampled decode that failed them is noise).
    strict: bool = False
    #: Which suspects climb it: whole chunks skip a rung that would decode exactly what the
    #: chunk decode did, and take the whole-chunk decode after the shifted one (below).
    for_chunks: bool = True
    for_gaps: bool = True
    #: The rung (by name) whose decode this one's first temperature repeats, same window and same
    #: way: only suspects whose decode there failed Whisper's checks (``needs_fallback``) climb
    #: it, as only those rows would be decoded again at the next temperature.
    repeats: str = ""


#: The decoding ladder, cheapest first, in the order each kind of suspect climbs it. A gap (a
#: stretch of a chunk): alone, timestamps, shifted, fallback. A whole chunk: shifted (its two
#: halves, one on each CPU worker), timestamps (the whole chunk), fallback; a translation's
#: whole chunk takes timestamps before shifted (``_ladder_for``). Which rung settled how many
#: suspects over the corpus: ``CoverageStats.settled`` in docs/corpus_eval.jsonl.
LADDER: tuple[Rung, ...] = (
    Rung("alone", FAST, for_chunks=False),
    Rung("timestamps", Decoding(timestamps=True), for_chunks=False),
    Rung("shifted", Decoding(timestamps=True), window="shifted"),
    Rung("timestamps", Decoding(timestamps=True), for_gaps=False),
    # last: sampling best of 5 at up to five temperatures costs as much as a dozen decodes of
    # the piece, and on the generated corpus one suspect reached it, which it settled (58c7345,
    # Intel Xeon; none reached it at ba9c1b1 and 6a0662e on an AMD EPYC: bench/corpus_eval.py)
    Rung("fallback", Decoding(timestamps=True, temperatures=FALLBACK_TEMPERATURES), strict=True, repeats="timestamps"),
)


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
    no_speech_threshold: float = NO_SPEECH_THRESHOLD
    logprob_threshold: float = LOGPROB_THRESHOLD
    #: The ladder; empty: the fast decode alone (for measuring what the ladder buys).
    ladder: tuple[Rung, ...] = LADDER
    #: A chunk or stretch with at least this much speech and no words is always suspect.
    min_suspect_s: float = 2.0
    #: ... and so is one with fewer words than this share of what the batch's own speech rate
    #: predicts for its speech. Speech runs 2-4 words per second of VAD speech (130-190 wpm
    #: with pauses inside the regions); a decode that stopped early says a small share of that.
    sparse_ratio: float = 0.35
    #: The speech rate assumed where the batch has too little decoded speech to measure its own
    #: (words per second of VAD speech), and the bounds of a measured one.
    default_rate: float = 2.5
    rate_bounds: tuple[float, float] = (1.5, 4.0)
    #: The shifted rung widens a short stretch by this much of its chunk's audio on each side, and
    #: cuts a stretch at least ``split_min_s`` long in two.
    shift_s: float = 3.0
    split_min_s: float = 8.0


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


def _inside(words: list[Word], span: Span) -> list[Word]:
    return [w for w in words if span[0] <= _middle(w) <= span[1]]


def _speech_seconds(speech: list[Span], span: Span) -> float:
    return sum(max(0.0, min(e, span[1]) - max(s, span[0])) for s, e in speech)


def _loops(segments: list[Segment], seconds: float | None = None) -> bool:
    """Whisper looping: its text ends in ``LOOP_COPIES`` or more back-to-back copies of a phrase
    (at least ``LOOP_WORDS`` words in all), or it compresses like a loop *and* runs faster than
    anyone speaks. Compression alone is not enough: real speech repeats itself (a phone menu says
    one prompt three times, measured at a ratio above 2.4) and must not be decoded again for it."""
    words = [w.strip(".,!?;:\"'()-").lower() for s in segments for w in s.text.split()]
    if _repeats_at_end(words):
        return True
    text = " ".join(s.text.strip() for s in segments)
    if seconds is None:
        seconds = sum(s.end - s.start for s in segments)
    return compression_ratio(text) > COMPRESSION_RATIO_THRESHOLD and len(words) > MAX_WORDS_PER_S * max(seconds, 1.0)


#: What a decoding loop looks like in words: at least this many copies, this many words in all.
LOOP_COPIES = 4
LOOP_WORDS = 16


def _repeats_at_end(words: list[str], longest: int = 16) -> bool:
    for unit in range(1, longest + 1):
        copies = 1
        while (copies + 1) * unit <= len(words) and words[len(words) - (copies + 1) * unit : len(words) - copies * unit] == words[len(words) - unit :]:
            copies += 1
        if copies >= LOOP_COPIES and copies * unit >= LOOP_WORDS:
            return True
    return False


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
            if not (span[0] <= (seg.start + seg.end) / 2 <= span[1]):
                out.append(seg)
            continue
        # a kept word that reached into the span (alignment stretched it over the words taken
        # out) ends, or starts, at the span's edge: the new words go there
        before = [_clipped(w, end=span[0]) for w in seg.words if _middle(w) < span[0]]
        after = [_clipped(w, start=span[1]) for w in seg.words if _middle(w) > span[1]]
        if len(before) + len(after) == len(seg.words) and not (before and after):
            out.append(seg)
            continue
        # split where the words were taken out, so the new ones fall between in time order
        for kept in (before, after):
            if kept:
                text = "".join(w.word for w in kept).strip()
                out.append(msgspec.structs.replace(seg, words=kept, text=text, start=kept[0].start, end=kept[-1].end))
    return out


def _clipped(word: Word, start: float = float("-inf"), end: float = float("inf")) -> Word:
    if word.start >= start and word.end <= end:
        return word
    return msgspec.structs.replace(word, start=max(word.start, start), end=min(word.end, end))


def speech_rate(chunks: list[Chunk], by_chunk: dict[int, list[Segment]], opts: CoverageOptions) -> float:
    """Words per second of VAD speech in this batch: the median over chunks with enough speech to
    measure, within ``rate_bounds``; ``default_rate`` where none has."""
    rates = []
    for c in chunks:
        seconds = _speech_seconds(c.speech or [(c.start, c.end)], (c.start, c.end))
        if not c.probe and seconds >= 5.0:
            rates.append(len(_words(by_chunk.get(c.index, []))) / seconds)
    rate = statistics.median(rates) if rates else opts.default_rate
    return min(max(rate, opts.rate_bounds[0]), opts.rate_bounds[1])


def plausible(words: int, speech_s: float, rate: float, opts: CoverageOptions) -> bool:
    """Enough words for this much speech: none for a short stretch may be right (a breath, a
    cough), none for ``min_suspect_s`` never is, and a small share of the rate is a decode that
    stopped early."""
    if speech_s < opts.min_suspect_s:
        return words > 0
    return words >= max(1.0, opts.sparse_ratio * rate * speech_s)


class Covered(NamedTuple):
    segments: list[Segment]
    language: str
    stats: CoverageStats
    #: The batch's VAD speech, and the part of it no word covers after the ladder (source seconds).
    speech: list[Span]
    unheard: list[Span]


def transcribe_covered(
    engine: Engine,
    audio: list[np.ndarray],
    chunks: list[Chunk],
    options: TranscribeOptions,
    opts: CoverageOptions | None = None,
) -> Covered:
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
    speech = merge([span for c in chunks if not c.probe for span in c.speech or [(c.start, c.end)]])
    # a translation's words are not timed against the speech closely enough to call its gaps
    # unheard: there, only a chunk that produced no words at all is
    unheard = (
        unheard_spans(chunks, by_chunk, opts)
        if options.task != "translate"
        else merge(r for c in chunks if not c.probe and not _words(by_chunk.get(c.index, [])) for r in c.speech)
    )
    stats = msgspec.structs.replace(
        repairs,
        probes=len(probes),
        rescued=len(rescued),
        rescued_seconds=round(sum(c.duration for c in rescued), 3),
        unheard_seconds=round(sum(e - s for s, e in unheard), 3),
    )
    return Covered(out, language, stats, [_rounded(s) for s in speech], [_rounded(s) for s in unheard])


def _rounded(span: Span) -> Span:
    return (round(span[0], 3), round(span[1], 3))


def unheard_spans(chunks: list[Chunk], by_chunk: dict[int, list[Segment]], opts: CoverageOptions) -> list[Span]:
    """VAD speech (not probes) that no word covers, in stretches of at least ``min_gap_s``."""
    return merge(
        gap
        for c in chunks
        if not c.probe
        for gap in uncovered(c.speech or [(c.start, c.end)], by_chunk.get(c.index, []), opts)
    )


@dataclass
class _Suspect:
    pos: int  # the chunk's position in the batch
    kind: Literal["gap", "chunk"]
    gap: Span  # what made it suspect (the whole chunk for a chunk)
    region: Span  # source span whose words its words may replace
    stretch: Span  # source span decoded on the first rungs (one piece of the chunk; a chunk: all)
    speech_s: float  # VAD speech inside gap: what its words must be plausible for
    looping: bool = False
    best: list[Segment] = field(default_factory=list)
    best_words: list[Word] = field(default_factory=list)
    best_in_gap: int = 0
    done: bool = False
    passed: set[str] = field(default_factory=set)  # rungs whose decode passed Whisper's checks


def _find_suspects(
    chunks: list[Chunk],
    by_chunk: dict[int, list[Segment]],
    rate: float,
    opts: CoverageOptions,
    tried: set[tuple],
    gaps: bool = True,
) -> list[_Suspect]:
    """This round's suspects; ``gaps=False``: whole chunks only (a translation's words line up
    only loosely with the speech, so a stretch without them is no sign of speech lost)."""
    found: list[_Suspect] = []
    for i, c in enumerate(chunks):
        if c.probe:
            continue
        speech = c.speech or [(c.start, c.end)]
        segments = by_chunk.get(c.index, [])
        whole = (c.start, c.end)
        speech_s = _speech_seconds(speech, whole)
        words = _words(segments)
        looping = bool(segments) and _loops(segments, speech_s)
        sparse = speech_s >= opts.min_suspect_s and not plausible(len(words), speech_s, rate, opts)
        if (looping or sparse) and ("chunk", c.index) not in tried:
            tried.add(("chunk", c.index))
            found.append(_Suspect(i, "chunk", whole, whole, whole, speech_s, looping=looping))
            continue
        if not gaps or ("heard nothing", c.index) in tried:
            continue  # the whole ladder heard nothing in the whole chunk: its parts are no different
        gaps_here = uncovered(speech, segments, opts)
        for gap in gaps_here + _sparse_regions(speech, words, gaps_here, rate, opts):
            key = (c.index, round(gap[0], 2), round(gap[1], 2))
            if key in tried:
                continue
            tried.add(key)
            # the whole of the VAD's speech around the gap: where Whisper merged a phrase said
            # twice, the words beside the gap are mistimed too; within the gap's own piece of
            # the chunk, with context: never across a cut pause
            around = [r for r in speech if overlap(r, gap)] or [gap]
            low, high = c.span_around(*gap)
            region = (max(low, min(r[0] for r in around)), min(high, max(r[1] for r in around)))
            stretch = (max(low, region[0] - opts.context_s), min(high, region[1] + opts.context_s))
            found.append(_Suspect(i, "gap", gap, region, stretch, _speech_seconds(speech, gap)))
    return found


def _sparse_regions(speech: list[Span], words: list[Word], gaps: list[Span], rate: float, opts: CoverageOptions) -> list[Span]:
    """The VAD regions of a chunk of several (each between two pauses) with at least
    ``min_suspect_s`` of speech and too few words for it (``plausible``, words counted by their
    middles), where no gap was found: Whisper skipped the sentence and alignment stretched its
    neighbours' words over it, so its audio looks covered (measured: "Others can start next
    month." before a 0.6 s pause, covered by "We" and "will" of the next sentence, 1.2 and 2.4 s
    long)."""
    if len(speech) < 2:
        return []  # the chunk itself: the chunk's own sparse check
    return [
        r for r in speech
        if r[1] - r[0] >= opts.min_suspect_s
        and not any(overlap(g, r) for g in gaps)
        and not plausible(len(_inside(words, r)), r[1] - r[0], rate, opts)
    ]


def _heard_window(chunk: Chunk, h0: float, h1: float, index: int) -> Chunk:
    """The part of ``chunk`` between ``h0`` and ``h1`` seconds of its (joined) audio, as a chunk
    of its own whose pieces map its audio back to the source."""
    pieces: list[Span] = []
    offset = 0.0
    for s, e in chunk.spans:
        length = e - s
        a, b = max(h0, offset), min(h1, offset + length)
        if b > a:
            pieces.append((s + a - offset, s + b - offset))
        offset += length
    if not pieces:
        t = chunk.to_source(h0)
        pieces = [(t, t)]
    if len(pieces) == 1:
        return Chunk(index=index, start=pieces[0][0], end=pieces[0][1])
    return Chunk(index=index, start=pieces[0][0], end=pieces[-1][1], pieces=pieces)


def _quietest(samples: np.ndarray, low: float, high: float) -> float:
    """Seconds into ``samples`` of the quietest 100 ms between ``low`` and ``high`` seconds."""
    hop = SAMPLE_RATE // 10
    a, b = int(low * SAMPLE_RATE) // hop, int(high * SAMPLE_RATE) // hop
    frames = [
        float(np.sqrt(np.mean(np.square(samples[k * hop : (k + 1) * hop], dtype=np.float64))))
        for k in range(a, max(a + 1, b))
        if (k + 1) * hop <= samples.size
    ]
    return (a + int(np.argmin(frames))) * hop / SAMPLE_RATE + 0.05 if frames else (low + high) / 2


def _cut(chunk: Chunk, samples: np.ndarray, h0: float, h1: float) -> float:
    """Where the shifted rung cuts ``h0..h1`` (seconds into the chunk's audio) in two: in the
    VAD's pause nearest the middle, if one lies in its middle half, each half then holds whole
    sentences (measured on ``tests/data/paragraphs_tts.opus``: cut mid-sentence at its quietest
    point, 21.4% WER; at its paragraph pause, 17.5%, as decoded whole); else at the quietest
    100 ms of its middle third."""
    speech = chunk.speech or [(chunk.start, chunk.end)]
    pauses = [(chunk.to_heard(a[1]), chunk.to_heard(b[0])) for a, b in zip(speech, speech[1:])]
    low, high, middle = h0 + 0.25 * (h1 - h0), h0 + 0.75 * (h1 - h0), (h0 + h1) / 2
    inside = [p for p in pauses if p[1] > p[0] and low <= (p[0] + p[1]) / 2 <= high]
    if inside:
        p0, p1 = min(inside, key=lambda p: abs((p[0] + p[1]) / 2 - middle))
        return _quietest(samples, p0, p1)
    return _quietest(samples, h0 + 0.35 * (h1 - h0), h0 + 0.65 * (h1 - h0))


def _heard(suspect: _Suspect, chunk: Chunk) -> Span:
    """The suspect's stretch in seconds into its chunk's audio."""
    if suspect.kind == "chunk":
        return 0.0, chunk.duration
    return chunk.to_heard(suspect.stretch[0]), chunk.to_heard(suspect.stretch[1])


def _halves(rung: Rung, seconds: float, opts: CoverageOptions) -> bool:
    """Whether ``rung`` decodes a stretch of ``seconds`` (heard) in two pieces."""
    return rung.window == "shifted" and seconds >= opts.split_min_s


def _inputs(
    rung: Rung, suspect: _Suspect, chunk: Chunk, samples: np.ndarray, opts: CoverageOptions
) -> list[tuple[np.ndarray, Chunk]]:
    """What one rung decodes for one suspect: (audio, chunk timing it) pairs; index 0 throughout."""
    h0, h1 = _heard(suspect, chunk)
    if rung.window == "shifted":
        if _halves(rung, h1 - h0, opts):  # cut in two near the middle, at a pause if there is one
            cut = _cut(chunk, samples, h0, h1)
            windows = [(h0, cut), (cut, h1)]
        else:  # widened by the chunk's audio around it
            windows = [(max(0.0, h0 - opts.shift_s), min(chunk.duration, h1 + opts.shift_s))]
    else:
        windows = [(h0, h1)]
    out = []
    for a, b in windows:
        piece = samples[round(a * SAMPLE_RATE) : round(b * SAMPLE_RATE)]
        if piece.size >= SAMPLE_RATE // 10:
            out.append((piece, _heard_window(chunk, a, b, 0)))
    return out


def _acceptable(rung: Rung, segments: list[Segment], opts: CoverageOptions) -> list[Segment]:
    """The decoded segments a rung may contribute: never a loop, and on a strict rung only what
    passed Whisper's log-probability check."""
    if not segments or _loops(segments):
        return []
    if rung.strict:
        return [s for s in segments if s.avg_logprob > opts.logprob_threshold]
    return segments


def _applies(rung: Rung, suspect: _Suspect) -> bool:
    if suspect.done or not (rung.for_chunks if suspect.kind == "chunk" else rung.for_gaps):
        return False
    return not rung.repeats or rung.repeats not in suspect.passed


def _decode_rung(
    engine: Engine,
    audio: list[np.ndarray],
    chunks: list[Chunk],
    rung: Rung,
    suspects: list[_Suspect],
    options: TranscribeOptions,
    opts: CoverageOptions,
) -> dict[int, list[Segment]]:
    """One engine call: every suspect's pieces for ``rung``; each suspect's acceptable segments
    (keyed by ``id``)."""
    pieces: list[np.ndarray] = []
    subs: list[Chunk] = []
    owner: list[_Suspect] = []
    for s in suspects:
        for piece, sub in _inputs(rung, s, chunks[s.pos], audio[s.pos], opts):
            pieces.append(piece)
            subs.append(msgspec.structs.replace(sub, index=len(subs)))
            owner.append(s)
    heard: dict[int, list[Segment]] = {id(s): [] for s in suspects}
    if not pieces:
        return heard
    found: dict[int, list[Segment]] = defaultdict(list)
    for seg in engine.transcribe_batch(pieces, subs, options, rung.decoding)[0]:
        found[seg.chunk].append(seg)
    failed: set[int] = set()
    for k, s in enumerate(owner):
        heard[id(s)].extend(_acceptable(rung, found.get(k, []), opts))
        if _fails_checks(found.get(k, [])):
            failed.add(id(s))
    for s in suspects:
        if id(s) not in failed:
            s.passed.add(rung.name)
    return heard


def _fails_checks(segments: list[Segment]) -> bool:
    """Whisper's fallback rule on one decoded piece (its segments share the row's scores): an
    empty decode, or one Whisper judged silence, would not be decoded again either."""
    if not segments:
        return False
    text = "".join(s.text for s in segments)
    return needs_fallback(text, segments[0].avg_logprob, segments[0].no_speech_prob)


def _pieces(rung: Rung, suspects: list[_Suspect], chunks: list[Chunk], opts: CoverageOptions) -> int:
    """How many pieces ``rung`` decodes for ``suspects`` (as ``_inputs`` cuts them, without
    cutting any audio)."""
    count = 0
    for s in suspects:
        h0, h1 = _heard(s, chunks[s.pos])
        count += 2 if _halves(rung, h1 - h0, opts) else 1
    return count


def _ladder_for(options: TranscribeOptions, opts: CoverageOptions) -> tuple[Rung, ...]:
    """The ladder, with a translation's whole chunks decoded whole before in halves: a half
    sentence translates badly (measured: es_lecture.mp4 with base, "transformed" lost to the
    halves), while a transcript's halves cut at a pause read as well as the whole."""
    if options.task != "translate":
        return opts.ladder
    whole = [r for r in opts.ladder if not r.for_gaps]
    rest = [r for r in opts.ladder if r.for_gaps]
    at = next((k for k, r in enumerate(rest) if r.window == "shifted"), len(rest))
    return (*rest[:at], *whole, *rest[at:])


def climb(
    engine: Engine,
    audio: list[np.ndarray],
    chunks: list[Chunk],
    suspects: list[_Suspect],
    options: TranscribeOptions,
    rate: float,
    opts: CoverageOptions,
    tally: Tally,
) -> None:
    """Take every suspect up the ladder, all those on a rung in one engine call, until its words
    are plausible for its speech or the ladder ends; each keeps its best acceptable words.

    **Look-ahead.** An engine that runs several calls at once to advantage
    (``Engine.parallel_calls``: CTranslate2 on CPU, one call per worker) sits partly idle in a
    rung's call whose pieces do not fill its workers (the common case: one suspect in a batch,
    one piece, one of two workers busy). Then the next rung's pieces for as many of the same
    suspects as fit the idle workers (a rung of one temperature only: never the fallback, which
    takes far longer) are decoded beside it: no wall time, and where the first rung's words are
    not plausible the next rung's are already there. A decode run ahead that no suspect needed is
    counted in ``tally.ahead``."""
    width = max(1, getattr(engine, "parallel_calls", 1))
    ahead: dict[int, dict[int, list[Segment]]] = {}  # rung index -> suspect id -> segments
    ladder = _ladder_for(options, opts)
    for i, rung in enumerate(ladder):
        climbing = [s for s in suspects if _applies(rung, s)]
        if not climbing:
            continue
        known = ahead.pop(i, {})
        tally.ahead += len(known.keys() - {id(s) for s in climbing})
        todo = [s for s in climbing if id(s) not in known]
        calls: list[tuple[Rung, list[_Suspect]]] = [(rung, todo)] if todo else []
        room = (-_pieces(rung, todo, chunks, opts)) % width  # workers idle in this call's last round
        j, nxt = next(((j, r) for j, r in enumerate(ladder) if j > i and len(r.decoding.temperatures) == 1), (0, None))
        if calls and room and nxt is not None:
            early: list[_Suspect] = []
            for s in todo:
                if _applies(nxt, s) and _pieces(nxt, [*early, s], chunks, opts) <= room:
                    early.append(s)
            if early:
                calls.append((nxt, early))
        started = time.perf_counter()
        if len(calls) > 1:
            with ThreadPoolExecutor(len(calls), thread_name_prefix="ladder") as pool:
                results = list(pool.map(lambda c: _decode_rung(engine, audio, chunks, c[0], c[1], options, opts), calls))
            ahead[j] = results[1]
        else:
            results = [_decode_rung(engine, audio, chunks, c[0], c[1], options, opts) for c in calls]
        if calls:
            tally.seconds[rung.name] = tally.seconds.get(rung.name, 0.0) + time.perf_counter() - started
        heard = {**known, **(results[0] if results else {})}
        tally.rungs[rung.name] = tally.rungs.get(rung.name, 0) + len(climbing)
        for s in climbing:
            segments = heard.get(id(s), [])
            words = _once(_inside(sorted(_words(segments), key=lambda w: w.start), s.region))
            # judged by the words that land in the gap itself: the region around it was heard
            margin = opts.word_margin_s
            in_gap = len(_inside(words, (s.gap[0] - margin, s.gap[1] + margin)))
            if in_gap > s.best_in_gap:
                s.best, s.best_words, s.best_in_gap = segments, words, in_gap
                # plausible: enough words for the speech, and no stretch of it left without any
                chunk = chunks[s.pos]
                target = [(max(a, s.gap[0]), min(b, s.gap[1])) for a, b in chunk.speech or [(chunk.start, chunk.end)]]
                left = uncovered([t for t in target if t[1] > t[0]], segments, opts)
                s.done = plausible(in_gap, s.speech_s, rate, opts) and not any(
                    b - a >= opts.min_suspect_s for a, b in left
                )
                if s.done:
                    tally.settled[rung.name] = tally.settled.get(rung.name, 0) + 1
    tally.ahead += sum(len(found) for found in ahead.values())


@dataclass
class Tally:
    """What the ladder did in one batch (``CoverageStats``): suspects each rung decoded, those it
    made plausible, decodes run ahead that no suspect needed, and the wall time of each rung."""

    rungs: dict[str, int] = field(default_factory=dict)
    settled: dict[str, int] = field(default_factory=dict)
    ahead: int = 0
    #: Wall seconds of each rung's engine calls (``CoverageStats.ladder_seconds``).
    seconds: dict[str, float] = field(default_factory=dict)


def _once(words: list[Word]) -> list[Word]:
    """Time-sorted words with a word said twice over the same audio kept once (two windows that
    meet, as the shifted rung's halves do, can both decode the word at their edge)."""
    out: list[Word] = []
    for w in words:
        prev = out[-1] if out else None
        if prev is not None and _norm(prev.word) == _norm(w.word) and _middle(w) <= prev.end + 0.1:
            continue
        out.append(w)
    return out


def _norm(word: str) -> str:
    return word.strip().strip(".,!?;:\"'()-").lower()


def _apply(suspect: _Suspect, chunk: Chunk, by_chunk: dict[int, list[Segment]], opts: CoverageOptions) -> bool:
    """Merge a suspect's best words into its chunk's segments; True if any were added."""
    heard = suspect.best_words
    if not heard:
        return False
    segments = by_chunk.get(chunk.index, [])
    before = _inside(_words(segments), suspect.region)
    confident = _confident(suspect.best, heard, suspect.region, opts)
    if confident and (len(heard) > len(before) or suspect.looping):
        # The stretch on its own says more than the chunk did (or the chunk looped): its words
        # replace the chunk's there (a phrase said twice and decoded once, a chunk ended early).
        by_chunk[chunk.index] = segments = _without(segments, suspect.region)
        fresh = heard
    else:
        existing = _covered(segments, 0.0, opts.max_word_s)
        fresh = [w for w in heard if not _overlaps(w, existing)]
    if not fresh:
        return False
    first = suspect.best[0]
    span = (min(w.start for w in fresh), max(w.end for w in fresh))
    by_chunk.setdefault(chunk.index, []).extend(
        cues.split_into_cues(
            Chunk(index=chunk.index, start=span[0], end=span[1]),
            "",
            fresh,
            keep_words=True,
            avg_logprob=first.avg_logprob,
            no_speech_prob=first.no_speech_prob,
        )
    )
    return True


def repair_gaps(
    engine: Engine,
    audio: list[np.ndarray],
    chunks: list[Chunk],
    by_chunk: dict[int, list[Segment]],
    options: TranscribeOptions,
    opts: CoverageOptions,
) -> CoverageStats:
    """Take what the decode left suspect up the ladder, and merge the words found into
    ``by_chunk`` (chunk index -> segments, with words), in place."""
    gaps, repaired, repaired_seconds = 0, 0, 0.0
    tally = Tally()
    tried: set[tuple] = set()
    rate = speech_rate(chunks, by_chunk, opts)
    for _ in range(opts.rounds):
        suspects = _find_suspects(chunks, by_chunk, rate, opts, tried, gaps=options.task != "translate")
        if not suspects:
            break
        gaps += len(suspects)
        climb(engine, audio, chunks, suspects, options, rate, opts, tally)
        for s in suspects:
            if s.kind == "chunk" and not s.best_words:
                tried.add(("heard nothing", chunks[s.pos].index))
            if _apply(s, chunks[s.pos], by_chunk, opts):
                repaired += 1
                repaired_seconds += s.gap[1] - s.gap[0]
    return CoverageStats(
        gaps=gaps, repaired=repaired, repaired_seconds=round(repaired_seconds, 3),
        rungs=tally.rungs, settled=tally.settled, ahead=tally.ahead,
        ladder_seconds={k: round(v, 3) for k, v in tally.seconds.items()},
    )
