"""Word timings from the transformers engine's cross-attention, through faster-whisper's own word
grouping: the alignment matrix of each row (OpenAI's ``find_alignment``), its DTW path
(``dtw.py``), and the model's alignment heads.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from workers.engines.dtw import dtw_batch

#: Mel frames per second, and encoder positions (DTW time steps) per second.
FRAMES_PER_SECOND = 100
TOKENS_PER_SECOND = 50
MEDIAN_FILTER_WIDTH = 7


class Aligner:
    """Stands in for faster-whisper's ``WhisperModel`` so that its ``add_word_timestamps`` and
    ``find_alignment`` (word grouping, punctuation, duration clamps) run on this engine's
    alignments: ``model.align`` is CTranslate2's ``Whisper.align``, done here in torch + numpy."""

    frames_per_second = FRAMES_PER_SECOND
    tokens_per_second = TOKENS_PER_SECOND

    def __init__(self, scored: dict[int, SimpleNamespace]) -> None:
        from faster_whisper.transcribe import WhisperModel

        self._scored = scored
        self._find_alignment = WhisperModel.find_alignment
        self.model = SimpleNamespace(align=self._align)

    def find_alignment(self, tokenizer, text_tokens, encoder_output, num_frames, median_filter_width=MEDIAN_FILTER_WIDTH):
        return self._find_alignment(self, tokenizer, text_tokens, encoder_output, num_frames, median_filter_width)

    def _align(self, rows, start_sequence, text_tokens, num_frames, median_filter_width=MEDIAN_FILTER_WIDTH):
        paths = dtw_batch([-_alignment_matrix(self._scored[row].qk, median_filter_width) for row in rows])
        return [
            SimpleNamespace(alignments=list(zip(text_idx, time_idx)), text_token_probs=self._scored[row].text_token_probs)
            for row, (text_idx, time_idx) in zip(rows, paths)
        ]


def _alignment_matrix(qk, width: int) -> np.ndarray:
    """OpenAI's ``find_alignment``: softmax over frames, normalise per frame, median filter, mean of heads."""
    import torch
    import torch.nn.functional as F

    weights = qk.softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = (weights - mean) / std
    pad = width // 2
    if weights.shape[-1] > pad:
        weights = F.pad(weights[None], (pad, pad, 0, 0), mode="reflect")[0]
        weights = weights.unfold(-1, width, 1).sort(dim=-1).values[..., pad]
    return weights.mean(dim=0).cpu().numpy().astype(np.float64)


def alignment_heads(checkpoint: Path) -> list[list[int]]:
    """The checkpoint's alignment heads (generation_config.json, as OpenAI's and converted checkpoints have them)."""
    import json

    path = checkpoint / "generation_config.json"
    heads = json.loads(path.read_text()).get("alignment_heads") if path.exists() else None
    return [[int(layer), int(head)] for layer, head in heads or []]


def default_alignment_heads(config) -> list[list[int]]:
    """Without the model's own list: every head of the upper half of the decoder (OpenAI's default)."""
    layers, heads = config.decoder_layers, config.decoder_attention_heads
    return [[layer, h] for layer in range(layers // 2, layers) for h in range(heads)]
