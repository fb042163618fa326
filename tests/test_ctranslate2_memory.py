"""The CTranslate2 engine's memory on CPU: its encoder and alignment calls take one chunk at a
time (their float32 attention scores were ~54 MB per chunk for tiny, all at once), and that
changes no result; what it encoded lately it reuses, within a bound, for the same result."""

from __future__ import annotations

import numpy as np
import pytest
from faster_whisper import WhisperModel, decode_audio
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer

from workers.engines.ctranslate2 import EncoderCache, _whisper_model_class, bundled_model_path


def test_one_chunk_per_encoder_and_alignment_call_gives_the_whole_batchs_results(data_dir):
    path = str(bundled_model_path())
    whole = WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=1)
    lean = _whisper_model_class(1)(path, device="cpu", compute_type="int8", cpu_threads=1)
    audio = decode_audio(str(data_dir / "talk_tts.mp4"))
    pieces = [audio[i * 160000 : (i + 1) * 160000] for i in range(2)]  # two 10 s chunks
    features = np.stack([pad_or_trim(whole.feature_extractor(p)[..., :-1]) for p in pieces])

    a, b = np.asarray(whole.encode(features)), np.asarray(lean.encode(features))
    assert a.shape == b.shape == (2, 1500, 384)
    np.testing.assert_allclose(a, b, atol=1e-4)

    tokenizer = Tokenizer(whole.hf_tokenizer, False, task="transcribe", language="en")
    texts = [tokenizer.encode(" And so my fellow Americans"), tokenizer.encode(" ask not")]
    frames = [1000, 1000]
    expected = whole.find_alignment(tokenizer, texts, whole.encode(features), frames)
    got = lean.find_alignment(tokenizer, texts, lean.encode(features), frames)
    assert [[w["word"] for w in row] for row in got] == [[w["word"] for w in row] for row in expected]
    # within one alignment frame (20 ms): on some CPUs the int8 kernels round a batch of one and
    # of two differently, and the cross-attention's DTW path may step a frame early (measured on
    # an AMD EPYC: 1.60 s against 1.62 s for one word)
    starts = [w["start"] for row in got for w in row]
    assert starts == pytest.approx([w["start"] for row in expected for w in row], abs=0.021)


def test_audio_encoded_again_reuses_the_encoders_output_with_the_same_result(data_dir):
    path = str(bundled_model_path())
    lean = _whisper_model_class(1)(path, device="cpu", compute_type="int8", cpu_threads=1)
    audio = decode_audio(str(data_dir / "talk_tts.mp4"))
    pieces = [audio[i * 160000 : (i + 1) * 160000] for i in range(3)]
    features = np.stack([pad_or_trim(lean.feature_extractor(p)[..., :-1]) for p in pieces])

    first = np.asarray(lean.encode(features[:2]))
    assert (lean.encoded.hits, lean.encoded.misses) == (0, 2)
    # a ladder rung: the second chunk again (whole, with timestamps), beside one not seen yet
    again = np.asarray(lean.encode(features[1:]))
    assert (lean.encoded.hits, lean.encoded.misses) == (1, 3)
    np.testing.assert_array_equal(again[0], first[1])
    fresh = _whisper_model_class(1)(path, device="cpu", compute_type="int8", cpu_threads=1)
    np.testing.assert_array_equal(again, np.asarray(fresh.encode(features[1:])))


def test_the_encoder_cache_keeps_the_most_recent_outputs_within_its_bytes():
    cache = EncoderCache(limit=3 * 400)
    rows = {k: np.full(100, k, dtype=np.float32) for k in range(4)}  # 400 bytes each
    for k in range(3):
        cache.put(bytes([k]), rows[k])
    assert cache.get(bytes([0])) is rows[0]  # used: now the most recent
    cache.put(bytes([3]), rows[3])  # over the limit: the least recently used (1) goes
    assert cache.get(bytes([1])) is None
    assert [cache.get(bytes([k])) is rows[k] for k in (0, 2, 3)] == [True, True, True]
    cache.put(bytes([9]), np.zeros(1000, dtype=np.float32))  # larger than the whole cache: not kept
    assert cache.get(bytes([9])) is None and cache.get(bytes([3])) is rows[3]
