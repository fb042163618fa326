"""WER the way the field computes it: Whisper's English normalizer on both sides, then jiwer."""

from __future__ import annotations

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer

_normalize = EnglishTextNormalizer()


def normalize(text: str) -> str:
    return _normalize(text)


def word_errors(reference: str, hypothesis: str) -> jiwer.WordOutput:
    return jiwer.process_words(normalize(reference), normalize(hypothesis))


def wer(reference: str, hypothesis: str) -> float:
    return word_errors(reference, hypothesis).wer
