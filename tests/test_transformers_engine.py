"""The transformers engine and the CTranslate2 -> transformers converter, on CPU with the bundled
tiny.en: same weights as the CTranslate2 engine, so the two must agree closely."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import anyio
import numpy as np
import pytest

from app.config import Settings
from app.messages import TranscribeOptions
from tests.wer import wer
from workers.engines.ct2_convert import cached_checkpoint, read_ct2
from workers.engines.ctranslate2 import bundled_model_path
from workers.local_runner import LocalRunner

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private XDG cache for the module: the engine converts the bundled model into it."""
    path = tmp_path_factory.mktemp("xdg-cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="module")
def runner(engines, cache_dir, tmp_path_factory):
    return LocalRunner(Settings.from_env(data_dir=str(tmp_path_factory.mktemp("data"))), engines=engines)


def transcribe(runner, path: Path, out: Path, **options):
    return anyio.run(lambda: runner.run(path, TranscribeOptions(**options), out))


def test_reads_the_ctranslate2_format():
    spec, variables = read_ct2(bundled_model_path() / "model.bin")
    assert spec == "WhisperSpec"
    assert variables["decoder/embeddings/weight"].shape == (51864, 384)
    assert variables["encoder/layer_0/self_attention/linear_0/weight"].shape == (3 * 384, 384)  # q, k, v fused
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]  # an alias


def test_converted_encoder_matches_ctranslate2(cache_dir, data_dir):
    """The converted weights compute what CTranslate2 computes (float32 on both sides)."""
    import ctranslate2
    import torch
    from faster_whisper import WhisperModel, decode_audio
    from faster_whisper.audio import pad_or_trim
    from transformers import WhisperForConditionalGeneration

    checkpoint = cached_checkpoint(bundled_model_path(), cache_dir)
    assert cached_checkpoint(bundled_model_path(), cache_dir) == checkpoint  # converted once
    assert not [p for p in checkpoint.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    ct2 = WhisperModel(str(bundled_model_path()), compute_type="float32", cpu_threads=1)
    audio = decode_audio(str(data_dir / "jfk.flac"))
    features = pad_or_trim(ct2.feature_extractor(audio)[..., :-1])[None].astype(np.float32)
    expected = np.asarray(ct2.model.encode(ctranslate2.StorageView.from_array(features), to_cpu=True))
    model = WhisperForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.inference_mode():
        got = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
    from workers.engines.transformers import _alignment_heads

    assert _alignment_heads(checkpoint)[:2] == [[1, 0], [2, 0]]  # from the CTranslate2 model's config.json


@pytest.mark.parametrize("name", ["jfk.flac", "talk_tts.mp4"])
def test_same_accuracy_as_ctranslate2_on_the_same_weights(name, runner, data_dir, tmp_path):
    reference = (data_dir / name).with_suffix(".ref.txt").read_text()
    # beam 1 on both: the test stays fast on CPU; both engines decode the same way
    ct2 = transcribe(runner, data_dir / name, tmp_path / "ct2", beam_size=1, word_timestamps=True)
    hf = transcribe(runner, data_dir / name, tmp_path / "hf", engine="transformers", beam_size=1, word_timestamps=True)
    wer_ct2, wer_hf = wer(reference, ct2.transcript.text), wer(reference, hf.transcript.text)
    assert wer_hf <= wer_ct2 + 0.02, f"{name}: transformers WER {wer_hf:.3f} vs ctranslate2 {wer_ct2:.3f}"
    assert wer_hf <= 0.10  # greedy tiny.en: talk_tts measures ~0.09 on both engines (beam 5: 0.034)
    assert hf.transcript.stats.engine == "transformers"
    segments = hf.transcript.segments
    assert segments
    for seg in segments:
        assert seg.words, seg
        assert seg.start <= seg.end
        for w in seg.words:  # word timings inside their segment, in order
            assert seg.start <= w.start <= w.end <= seg.end, (seg, w)
        assert [w.start for w in seg.words] == sorted(w.start for w in seg.words)
        assert seg.no_speech_prob < 0.6 or seg.avg_logprob >= -1.0  # Whisper's rule let it through
    # the same words get the same times as from the CTranslate2 engine, within a few frames
    words_ct2 = [w for s in ct2.transcript.segments for w in s.words]
    words_hf = [w for s in segments for w in s.words]
    key = lambda w: w.word.strip(" .,?!").lower()  # noqa: E731
    matcher = difflib.SequenceMatcher(a=[key(w) for w in words_ct2], b=[key(w) for w in words_hf], autojunk=False)
    pairs = [(words_ct2[m.a + k], words_hf[m.b + k]) for m in matcher.get_matching_blocks() for k in range(m.size)]
    assert len(pairs) >= 0.9 * len(words_ct2)
    off = [abs(a.start - b.start) for a, b in pairs]
    assert np.median(off) <= 0.06 and max(off) <= 1.0, sorted(off)[-5:]


def test_silence_stays_empty(runner, data_dir, tmp_path):
    result = transcribe(runner, data_dir / "silence.mp4", tmp_path, engine="transformers")
    assert result.transcript.text == "" and result.transcript.segments == []


def test_cli_engine_transformers_converts_on_first_use(data_dir, tmp_path):
    """`vtp transcribe --engine transformers` with the bundled model, offline, from an empty cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTP_")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-m", "app.cli", "transcribe", "-q", "--engine", "transformers", "--beam-size", "1",
         "--formats", "txt", "-o", str(tmp_path / "out"), str(data_dir / "jfk.flac")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "ask not what your country can do for you" in " ".join((tmp_path / "out" / "jfk.txt").read_text().split())
    assert list((tmp_path / "cache" / "vtp" / "transformers").iterdir())  # the converted copy


@pytest.mark.gpu
@pytest.mark.parametrize("compute_type", ["float16", "bfloat16"])
def test_on_cuda_in_half_precision(compute_type, runner, data_dir, tmp_path):
    """The GPU worker's configuration: the same speech, the same words, in fp16/bf16 on CUDA
    (skipped where there is no CUDA GPU, as on CI)."""
    result = transcribe(
        runner, data_dir / "jfk.flac", tmp_path, engine="transformers", device="cuda", compute_type=compute_type
    )
    reference = (data_dir / "jfk.ref.txt").read_text()
    assert wer(reference, result.transcript.text) <= 0.05
    assert result.transcript.stats.engine == "transformers"


def test_a_batch_that_runs_out_of_gpu_memory_is_halved_and_the_size_kept(cache_dir, data_dir):
    """A card that holds 2 chunks at a time: the engine's own model calls are what run out (a
    CUDA OOM raised by the real ``_transcribe`` wrapped here, since this machine has no GPU)."""
    import torch
    from faster_whisper import decode_audio

    from app.messages import Chunk
    from workers.engines.transformers import TransformersEngine

    engine = TransformersEngine.load(TranscribeOptions(engine="transformers"), cache_dir=cache_dir)
    audio = decode_audio(str(data_dir / "talk_tts.mp4"))
    pieces = [audio[i * 160_000 : (i + 1) * 160_000] for i in range(5)]  # 5 chunks of 10 s
    chunks = [Chunk(index=i, start=i * 10.0, end=(i + 1) * 10.0) for i in range(5)]
    options = TranscribeOptions(engine="transformers", beam_size=1)
    expected, _ = engine.transcribe_batch(pieces, chunks, options)

    real, calls = engine._transcribe, []

    def small_card(audio, chunks, options):
        calls.append(len(audio))
        if len(audio) * options.beam_size > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(audio, chunks, options)

    engine._transcribe = small_card
    got, language = engine.transcribe_batch(pieces, chunks, options)
    assert calls == [5, 2, 2, 1]  # halved once, then the size that fitted
    assert engine.max_sequences == 2 and language == "en"
    assert [s.text for s in got] == [s.text for s in expected]
    calls.clear()
    engine.transcribe_batch(pieces[:3], chunks[:3], options)
    assert calls == [2, 1]  # later calls start at the size that fitted
    calls.clear()
    with pytest.raises(Exception, match="out of memory"):  # one chunk that does not fit: a (transient) EngineError
        engine.transcribe_batch(pieces[:1], chunks[:1], TranscribeOptions(engine="transformers", beam_size=5))
