"""The transformers engine's batched kernels against what they replace: ``mel.log_mel`` against
faster-whisper's per-chunk feature extractor, ``dtw.dtw_batch`` against OpenAI's DTW loop."""

from __future__ import annotations

import numpy as np
import pytest

from workers.engines.dtw import dtw_batch
from workers.engines.mel import log_mel


def dtw_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``whisper.timing.dtw_cpu``, cell by cell."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf)
    trace = -np.ones((n + 1, m + 1))
    cost[0, 0] = 0
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = x[i - 1, j - 1] + c
            trace[i, j] = t
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = trace[i, j]
        i, j = (i - 1, j - 1) if t == 0 else (i - 1, j) if t == 1 else (i, j - 1)
    path = np.array(path[::-1])
    return path[:, 0], path[:, 1]


@pytest.mark.parametrize("ties", [False, True])
def test_dtw_batch_is_openais_dtw_row_by_row(ties):
    rng = np.random.default_rng(7)
    for _ in range(25):
        shapes = [(int(rng.integers(1, 12)), int(rng.integers(1, 25))) for _ in range(int(rng.integers(1, 7)))]
        # small integers make ties everywhere: the tie-breaking must be OpenAI's
        mats = [rng.integers(0, 3, s).astype(float) if ties else rng.normal(size=s) for s in shapes]
        for mat, (got_i, got_j) in zip(mats, dtw_batch(mats)):
            want_i, want_j = dtw_reference(mat)
            assert np.array_equal(got_i, want_i) and np.array_equal(got_j, want_j), mat


def test_dtw_batch_of_nothing():
    assert dtw_batch([]) == []


def test_log_mel_is_faster_whispers_features_for_every_chunk(data_dir):
    import torch
    from faster_whisper import decode_audio
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.feature_extractor import FeatureExtractor

    audio = decode_audio(str(data_dir / "talk_tts.mp4"))
    rng = np.random.default_rng(0)
    chunks = [
        audio[: 30 * 16000],  # a full window
        audio[100_000 : 100_000 + 7 * 16000 + 37],  # short, not a whole number of frames
        audio[5_000 : 5_000 + 30 * 16000 - 3],
        np.zeros(16000, np.float32),  # silence
        (rng.standard_normal(1234) * 0.1).astype(np.float32),  # under a second of noise
    ]
    for n_mels in (80, 128):
        extractor = FeatureExtractor(feature_size=n_mels)
        want = np.stack([pad_or_trim(extractor(c)[..., :-1]) for c in chunks])
        got = log_mel(chunks, extractor.mel_filters, "cpu", torch.float32).numpy()
        assert got.shape == want.shape == (len(chunks), n_mels, 3000)
        assert np.abs(got - want).max() < 1e-4
