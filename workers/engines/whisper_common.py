"""What both Whisper engines share: a chunk's words mapped back to the source, faster-whisper's
word-timing input, the translate check and the one-line error text.

The CTranslate2 engine (``ctranslate2.py``) and the transformers engine (``transformers.py``) both
import this module; neither imports the other. The transformers engine's word alignment is beside
this (``alignment.py``, ``dtw.py``).
"""

from __future__ import annotations

from app import errors
from app.messages import Chunk, Word

#: ``add_word_timestamps``' "last speech" time: none before a chunk, so its first word may be
#: clamped when DTW stretched it (as it was for every chunk when times were absolute).
NO_SPEECH_BEFORE = float("-inf")


def check_task(multilingual: bool, task: str, model: str) -> None:
    """An English-only model cannot translate: a permanent error, never English text passed
    off as a translation."""
    if task == "translate" and not multilingual:
        raise errors.OptionsError(f"model {model!r} is English-only and cannot translate: use a multilingual model such as base")


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def subsegment(tokens: list[int], chunk: Chunk) -> list[dict]:
    """What ``WhisperModel.add_word_timestamps`` takes for one chunk, timed in the chunk's own
    (joined) audio; ``source_word`` maps its words back to the source."""
    return [{"tokens": tokens, "start": 0.0, "end": chunk.duration, "seek": 0}]


def source_word(w: dict, chunk: Chunk) -> Word:
    """A word timed in the chunk's own audio -> a Word timed in the source."""
    heard = chunk.duration
    start = chunk.to_source(min(max(float(w["start"]), 0.0), heard))
    end = chunk.to_source(min(max(float(w["end"]), 0.0), heard))
    return Word(start=round(start, 3), end=round(max(end, start), 3), word=w["word"],
                probability=round(float(w["probability"]), 4))
