"""The decoding ladder: a decode that returns little or nothing where the VAD heard speech is a
suspect, and asking again the same way is not a second opinion.

``paragraphs_tts.opus`` is a real failure: a 29.9 s window of two synthetic voices (a paragraph,
1.2 s of silence, the next paragraph) that tiny.en, decoding without timestamp tokens, ends at
once (0 words on the machine it was made on), and decodes in full with timestamps. Whether a given
CPU's int8 kernels reproduce that exact failure varies, so the rung-by-rung tests make each rung's
failure certain instead: the real engine, deaf to the rungs below the one under test.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from app.messages import Segment, TranscribeOptions
from tests.support import media
from tests.support.wer import deletion_runs, word_errors
from workers import coverage, vad
from workers.engines.base import FAST, Decoding
from workers.engines.noop import NoopEngine

WINDOW = "paragraphs_tts.opus"
RUNG = {r.name: r for r in coverage.LADDER}
TIMESTAMPS = RUNG["timestamps"].decoding  # the shifted rung decodes this way too, its own windows


class Deaf:
    """The real engine, except that it hears nothing when asked to decode in one of ``deaf_to``
    ways (as tiny.en hears nothing in some windows without timestamps) audio longer than
    ``longer_than`` and shorter than ``shorter_than`` seconds; ``loops``: it says one word over
    and over there instead, a decode that fails Whisper's checks. Counts its calls."""

    def __init__(self, engine, deaf_to: tuple[Decoding, ...] = (), longer_than: float = 0.0,
                 shorter_than: float = float("inf"), loops: bool = False) -> None:
        self.engine, self.deaf_to, self.longer_than, self.shorter_than = engine, deaf_to, longer_than, shorter_than
        self.loops = loops
        self.name, self.model_name = engine.name, engine.model_name
        self.calls: list[Decoding] = []

    def transcribe_batch(self, audio, chunks, options, decoding=FAST):
        self.calls.append(decoding)
        deaf = [decoding in self.deaf_to and self.longer_than < a.size / 16000 < self.shorter_than for a in audio]
        if not any(deaf):
            return self.engine.transcribe_batch(audio, chunks, options, decoding)
        keep = [i for i in range(len(audio)) if self.loops or not deaf[i]]
        segments, language = self.engine.transcribe_batch([audio[i] for i in keep], [chunks[i] for i in keep], options, decoding)
        looping = {chunks[i].index for i in keep if deaf[i]}
        return [looped(s) if s.chunk in looping else s for s in segments], language


def looped(seg: Segment) -> Segment:
    """``seg`` with every word replaced by one word, as Whisper loops (compression ratio far above
    2.4): a decode that fails Whisper's checks."""
    words = list(seg.words or [])
    loop = [type(w)(start=w.start, end=w.end, word=" country", probability=0.9) for w in words]
    return Segment(start=seg.start, end=seg.end, text=" country" * len(loop), words=loop, chunk=seg.chunk,
                   avg_logprob=-0.2, no_speech_prob=seg.no_speech_prob)


@pytest.fixture(scope="module")
def window(data_dir):
    audio = media.load_pcm(data_dir / WINDOW)
    chunks = vad.find_chunks(audio)
    pieces = [np.concatenate([audio[a:b] for a, b in c.sample_ranges]) for c in chunks]
    return pieces, chunks, media.reference(data_dir, WINDOW)


@pytest.fixture(scope="module")
def engine(engines):
    return engines.get(TranscribeOptions())


def covered_text(result: coverage.Covered) -> str:
    return " ".join(s.text for s in result.segments)


def test_a_window_whisper_ends_at_once_loses_no_speech(engine, window, data_dir):
    pieces, chunks, reference = window
    result = coverage.transcribe_covered(engine, pieces, chunks, TranscribeOptions())
    text = covered_text(result)
    assert not deletion_runs(reference, text), text
    plain, _ = engine.model.transcribe(str(data_dir / WINDOW), beam_size=5, language="en")
    sequential = " ".join(s.text for s in plain)
    # within a phrase of sequential's: the two decode the window differently (with and without
    # timestamp tokens, whole and in parts), and which phrase of it each gets wrong depends on the
    # CPU's int8 kernels (measured: "the role of water" heard as "Marolan Wager", 3 words of 103)
    assert word_errors(reference, text).wer <= word_errors(reference, sequential).wer + 0.04, (text, sequential)
    assert result.stats.unheard_seconds == 0 and result.unheard == []
    assert result.speech and sum(e - s for s, e in result.speech) > 20


@pytest.mark.parametrize(
    ("deaf", "climbed_to"),
    [
        # a whole chunk climbs: its halves (shifted), the whole with timestamps, the fallback
        (dict(deaf_to=(FAST,)), "shifted"),
        # deaf to the first half (cut at the paragraph pause: 19.9 s), not to the whole window
        (dict(deaf_to=(FAST, TIMESTAMPS), longer_than=12.0, shorter_than=25.0), "timestamps"),
        # decodes of the whole and of the first half at temperature 0 loop: only sampling hears
        (dict(deaf_to=(FAST, TIMESTAMPS), longer_than=12.0, loops=True), "fallback"),
    ],
    ids=["shifted", "timestamps", "fallback"],
)
def test_the_ladder_climbs_until_the_words_are_plausible(engine, window, deaf, climbed_to):
    pieces, chunks, reference = window
    assert all(p.size / 16000 > 25 for p in pieces)
    deaf = Deaf(engine, **deaf)
    result = coverage.transcribe_covered(deaf, pieces, chunks, TranscribeOptions())
    text = covered_text(result)
    assert not deletion_runs(reference, text), text
    assert word_errors(reference, text).wer < 0.35, text
    assert result.stats.unheard_seconds == 0
    assert result.stats.repaired >= 1
    # settled there (the fallback keeps only what passes Whisper's checks: what it heard may
    # leave a stretch for the next round, its words kept all the same)
    assert climbed_to in result.stats.settled or climbed_to == "fallback"
    order = [r.name for r in coverage.LADDER if r.for_chunks]
    assert set(order[: order.index(climbed_to) + 1]) <= set(result.stats.rungs)  # in order
    assert ("fallback" in result.stats.rungs) == (climbed_to == "fallback")  # and stopped there
    # what each rung cost is reported beside how often it fired (a rung decoded only ahead, beside
    # another, is timed in that one's call)
    assert set(result.stats.ladder_seconds) <= set(result.stats.rungs)
    assert all(seconds > 0 for seconds in result.stats.ladder_seconds.values())


def test_the_ladder_costs_nothing_where_nothing_is_suspect(engine, data_dir):
    audio = media.load_pcm(data_dir / "jfk.flac")
    chunks = vad.find_chunks(audio)
    pieces = [np.concatenate([audio[a:b] for a, b in c.sample_ranges]) for c in chunks]
    counting = Deaf(engine)
    result = coverage.transcribe_covered(counting, pieces, chunks, TranscribeOptions())
    assert counting.calls == [FAST]
    assert result.stats.rungs == {} and result.stats.gaps == 0 and result.stats.ladder_seconds == {}
    assert result.stats.unheard_seconds == 0


def test_speech_no_rung_hears_is_reported_unheard(data_dir):
    """An engine that hears nothing: every rung fires once, and all the VAD's speech is unheard."""
    audio = media.load_pcm(data_dir / "jfk.flac")
    chunks = vad.find_chunks(audio)
    pieces = [np.concatenate([audio[a:b] for a, b in c.sample_ranges]) for c in chunks]
    result = coverage.transcribe_covered(NoopEngine(TranscribeOptions(engine="noop")), pieces, chunks, TranscribeOptions())
    speech = sum(e - s for s, e in result.speech)
    assert result.segments == []
    assert speech > 8 and result.stats.unheard_seconds == pytest.approx(speech, abs=0.01)
    assert result.unheard == result.speech
    # "alone" is the chunk itself; the fallback would only repeat the timestamps rung's empty
    # decode at its first temperature, and Whisper samples only where that one failed its checks
    assert result.stats.rungs == {"shifted": 1, "timestamps": 1} and result.stats.settled == {}


def test_a_looping_decode_is_replaced(engine, data_dir):
    """A chunk whose fast decode loops (made certain: the real decode replaced by one word said
    over and over, as Whisper loops) goes up the ladder and gets its real words back."""
    audio = media.load_pcm(data_dir / "jfk.flac")
    chunks = vad.find_chunks(audio)
    pieces = [np.concatenate([audio[a:b] for a, b in c.sample_ranges]) for c in chunks]

    result = coverage.transcribe_covered(Deaf(engine, (FAST,), loops=True), pieces, chunks, TranscribeOptions())
    text = covered_text(result)
    reference = media.reference(data_dir, "jfk.flac")
    assert word_errors(reference, text).wer <= 0.15, text
    assert result.stats.settled


def test_plausibility_follows_the_speech_rate():
    opts = coverage.CoverageOptions()
    assert not coverage.plausible(0, 2.0, 2.5, opts)  # none for 2 s of speech: always suspect
    assert coverage.plausible(0, 1.5, 2.5, opts) is False and coverage.plausible(1, 1.5, 2.5, opts)
    assert not coverage.plausible(3, 29.0, 2.5, opts)  # "Let us begin" for 29 s
    assert coverage.plausible(60, 29.0, 2.5, opts)
    assert coverage.plausible(20, 29.0, 1.5, opts) and not coverage.plausible(20, 29.0, 4.0, opts)


def _segment(chunk: int, words: list[tuple[float, float, str]]) -> Segment:
    from app.messages import Word

    timed = [Word(start=a, end=b, word=" " + w, probability=0.9) for a, b, w in words]
    return Segment(start=timed[0].start, end=timed[-1].end, text="".join(w.word for w in timed), words=timed,
                   chunk=chunk, avg_logprob=-0.3, no_speech_prob=0.01)


def test_a_sentence_skipped_between_pauses_is_suspect_though_stretched_words_cover_it():
    """Whisper skipped the sentence before a pause ("Others can start next month.", 2.3 s), and
    alignment stretched the next sentence's first words back over it ("We" 1.2 s, "will" 2.4 s):
    no second of its audio is left uncovered, yet one word for 2.3 s of speech is too few. The
    region is a suspect; taking its words out clips the stretched word at the region's edge."""
    from app.messages import Chunk

    chunk = Chunk(index=0, start=0.0, end=20.0, speech=[(0.0, 2.3), (2.9, 20.0)])
    rest = [(3.66 + 0.4 * k, 4.0 + 0.4 * k, f"w{k}") for k in range(40)]
    seg = _segment(0, [(0.0, 1.24, "We"), (1.24, 3.66, "will"), *rest])
    opts = coverage.CoverageOptions()
    assert coverage.uncovered(chunk.speech, [seg], opts) == []  # the stretched words cover it
    found = coverage._find_suspects([chunk], {0: [seg]}, 2.5, opts, set())
    assert [(s.kind, s.gap) for s in found] == [("gap", (0.0, 2.3))]
    kept = coverage._without([seg], (0.0, 2.3))
    assert kept[0].words[0].word == " will" and kept[0].words[0].start == 2.3

    # the same chunk with the sentence heard: nothing is suspect
    heard = _segment(0, [(0.1, 0.5, "Others"), (0.5, 0.7, "can"), (0.7, 1.1, "start"), (1.1, 1.5, "next"),
                         (1.5, 2.1, "month"), (3.0, 3.3, "We"), (3.3, 3.6, "will"), *rest])
    assert coverage._find_suspects([chunk], {0: [heard]}, 2.5, opts, set()) == []


def test_the_token_budget_bounds_a_loop_not_speech():
    """A decode may not run past what its audio could hold: fast English (4 words a second, about
    1.5 tokens a word) always fits, a loop on a 5 s piece stops far below Whisper's 448 tokens,
    and the model's own limit is never exceeded."""
    from workers.engines.base import token_budget

    for seconds in (0.5, 2, 5, 12, 29.9):
        assert token_budget(seconds, "en", 445) >= 4 * 1.5 * seconds
        assert token_budget(seconds, "ja", 445) >= token_budget(seconds, "en", 445)
    assert token_budget(5, "en", 445) < 100
    assert token_budget(30, "en", 445) <= 445 and token_budget(60, None, 445) == 445


class Wide(Deaf):
    """The real engine, ``parallel_calls`` wide, that does not hear the words whose middle falls
    in ``hole`` (source seconds) when decoding fast (as tiny.en skips a phrase without timestamp
    tokens); records when each call ran."""

    def __init__(self, engine, hole: tuple[float, float], parallel_calls: int) -> None:
        super().__init__(engine)
        self.hole, self.parallel_calls = hole, parallel_calls
        self.spans: list[tuple[Decoding, float, float]] = []

    def transcribe_batch(self, audio, chunks, options, decoding=FAST):
        t0 = time.perf_counter()
        segments, language = super().transcribe_batch(audio, chunks, options, decoding)
        self.spans.append((decoding, t0, time.perf_counter()))
        if decoding != FAST:
            return segments, language
        out = []
        for seg in segments:
            words = [w for w in seg.words or [] if not self.hole[0] <= (w.start + w.end) / 2 <= self.hole[1]]
            if words:
                out.append(Segment(start=words[0].start, end=words[-1].end, text="".join(w.word for w in words),
                                   words=words, chunk=seg.chunk, avg_logprob=seg.avg_logprob,
                                   no_speech_prob=seg.no_speech_prob))
        return out, language


@pytest.mark.parametrize("width", [1, 2])
def test_the_next_rung_runs_beside_a_call_too_small_for_the_engine(engine, data_dir, width):
    """One suspect, one piece: on an engine with two workers, the next rung (timestamps) is
    decoded beside the first (alone) instead of after it, with the same words in the end."""
    audio = media.load_pcm(data_dir / "jfk.flac")
    chunks = vad.find_chunks(audio)
    pieces = [np.concatenate([audio[a:b] for a, b in c.sample_ranges]) for c in chunks]
    reference = media.reference(data_dir, "jfk.flac")
    wide = Wide(engine, hole=(3.5, 7.0), parallel_calls=width)
    result = coverage.transcribe_covered(wide, pieces, chunks, TranscribeOptions())
    text = covered_text(result)
    assert not deletion_runs(reference, text), text
    assert result.stats.rungs == {"alone": 1, "timestamps": 1}
    assert result.stats.settled == {"timestamps": 1} and result.stats.ahead == 0
    alone = next(s for s in wide.spans[1:] if s[0] == FAST)
    timestamps = next(s for s in wide.spans[1:] if s[0] == TIMESTAMPS)
    beside = timestamps[1] < alone[2] and alone[1] < timestamps[2]
    assert beside == (width == 2)


def test_a_jobs_ladder_cost_is_the_sum_over_its_batches():
    from app.messages import CoverageStats

    a = CoverageStats(rungs={"alone": 1}, ladder_seconds={"alone": 1.25})
    b = CoverageStats(rungs={"alone": 2, "shifted": 1}, ladder_seconds={"alone": 0.5, "shifted": 2.0})
    total = sum((a, b), CoverageStats())
    assert total.rungs == {"alone": 3, "shifted": 1}
    assert total.ladder_seconds == {"alone": 1.75, "shifted": 2.0}
