"""WER the way the field computes it: Whisper's English normalizer on both sides, then jiwer."""

from __future__ import annotations

import jiwer
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

_normalize = EnglishTextNormalizer()
_basic = BasicTextNormalizer()


def normalize(text: str) -> str:
    return _normalize(text)


def word_errors(reference: str, hypothesis: str) -> jiwer.WordOutput:
    return jiwer.process_words(normalize(reference), normalize(hypothesis))


def wer(reference: str, hypothesis: str) -> float:
    return word_errors(reference, hypothesis).wer


def wer_any(reference: str, hypothesis: str) -> float:
    """WER for any language: Whisper's basic normalizer (case, punctuation; accents kept)."""
    return jiwer.wer(_basic(reference), _basic(hypothesis))


def deletion_runs(reference: str, hypothesis: str, min_words: int = 5) -> list[str]:
    """Speech lost: each run of at least ``min_words`` consecutive reference words that the
    hypothesis has nothing for (jiwer's alignment), as the missing text.

    WER hides these: one dropped sentence and a few wrong words can score alike, but only the
    first loses what was said.
    """
    out = word_errors(reference, hypothesis)
    runs: list[str] = []
    for ref_words, chunks in zip(out.references, out.alignments):
        for chunk in chunks:
            if chunk.type == "delete" and chunk.ref_end_idx - chunk.ref_start_idx >= min_words:
                runs.append(" ".join(ref_words[chunk.ref_start_idx : chunk.ref_end_idx]))
    return runs


def kept_words(reference: str, hypothesis: str) -> list[bool]:
    """Per normalized reference word: whether the hypothesis has something for it (a match or
    a substitution, not a deletion) in jiwer's alignment."""
    out = word_errors(reference, hypothesis)
    kept = [True] * len(out.references[0]) if out.references else []
    for chunks in out.alignments:
        for chunk in chunks:
            if chunk.type == "delete":
                for i in range(chunk.ref_start_idx, chunk.ref_end_idx):
                    kept[i] = False
    return kept


def runs_lost_against(reference: str, hypothesis: str, yardstick: str, min_words: int = 5) -> list[str]:
    """Deletion runs of at least ``min_words`` reference words in ``hypothesis`` that the
    ``yardstick`` transcript (plain sequential Whisper) mostly keeps: at least half of the run's
    words are there in the yardstick. Speech one system lost that the other heard."""
    if not normalize(reference).split():
        return []
    kept = kept_words(reference, yardstick)
    out = word_errors(reference, hypothesis)
    runs: list[str] = []
    for ref_words, chunks in zip(out.references, out.alignments):
        for chunk in chunks:
            start, end = chunk.ref_start_idx, chunk.ref_end_idx
            if chunk.type == "delete" and end - start >= min_words and 2 * sum(kept[start:end]) >= end - start:
                runs.append(" ".join(ref_words[start:end]))
    return runs
