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
from tests.support.wer import deletion_runs, wer
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
    from workers.engines.alignment import alignment_heads as _alignment_heads

    assert _alignment_heads(checkpoint)[:2] == [[1, 0], [2, 0]]  # from the CTranslate2 model's config.json


@pytest.mark.parametrize("name", ["jfk.flac", "talk_tts.mp4"])
def test_same_accuracy_as_ctranslate2_on_the_same_weights(name, runner, data_dir, tmp_path):
    reference = (data_dir / name).with_suffix(".ref.txt").read_text()
    # beam 1 on both: the test stays fast on CPU; both engines decode the same way
    ct2 = transcribe(runner, data_dir / name, tmp_path / "ct2", beam_size=1, word_timestamps=True)
    hf = transcribe(runner, data_dir / name, tmp_path / "hf", engine="transformers", beam_size=1, word_timestamps=True)
    wer_ct2, wer_hf = wer(reference, ct2.transcript.text), wer(reference, hf.transcript.text)
    # greedy fp32 and greedy int8 part ways on a phrase or two (talk_tts: 0.086 vs 0.052, all of
    # it one phrase's substitutions, since chunks are cut at the VAD's pauses): the same within
    # that, and neither loses a run of words
    assert wer_hf <= wer_ct2 + 0.04, f"{name}: transformers WER {wer_hf:.3f} vs ctranslate2 {wer_ct2:.3f}"
    assert not deletion_runs(reference, hf.transcript.text), hf.transcript.text
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

    def small_card(audio, chunks, options, decoding):
        calls.append(len(audio))
        if len(audio) * options.beam_size > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(audio, chunks, options, decoding)

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


# -- the coverage ladder's decodes and the looping guard ---------------------------------------------


@pytest.fixture(scope="module")
def engine(cache_dir):
    from workers.engines.transformers import TransformersEngine

    return TransformersEngine.load(TranscribeOptions(engine="transformers"), cache_dir=cache_dir)


@pytest.fixture(scope="module")
def speech(data_dir):
    """Windows of the repository's speech that tiny.en gets wrong in the fast decode (measured):
    talk_tts 10-40 s ends at once without timestamp tokens (1 word; 60 with them), ivr_prompts
    60-90 s loops ("to increase the audio volume from other participants" to the token limit)."""
    from tests.support.media import RATE, load_pcm

    talk, ivr = load_pcm(data_dir / "talk_tts.mp4"), load_pcm(data_dir / "ivr_prompts.mp4")
    return {
        "jfk": load_pcm(data_dir / "jfk.flac"),
        "ends_early": talk[10 * RATE : 40 * RATE],
        "loops": ivr[60 * RATE : 90 * RATE],
    }


def decode(engine, audio, decoding, beam_size=1):
    """Transcribe whole windows as chunks of their own; the words and the decoder steps taken."""
    from app.messages import Chunk

    steps = [0]

    def count(_module, _args, kwargs):
        ids = kwargs.get("input_ids")
        steps[0] += ids is not None and ids.shape[1] == 1  # one new token per row: a generation step

    chunks = [Chunk(index=i, start=0.0, end=a.size / 16000) for i, a in enumerate(audio)]
    hook = engine.model.model.decoder.register_forward_pre_hook(count, with_kwargs=True)
    try:
        segments, _ = engine.transcribe_batch(
            audio, chunks, TranscribeOptions(engine="transformers", beam_size=beam_size, word_timestamps=True), decoding
        )
    finally:
        hook.remove()
    words = [[w.word.strip() for s in segments if s.chunk == i for w in s.words] for i in range(len(audio))]
    return words, segments, steps[0]


def test_timestamps_decode_hears_a_window_the_fast_decode_ends_at_once(engine, speech):
    """Rung 1: the window decoded with timestamp tokens, as sequential Whisper does, gives what
    CTranslate2 gives decoding it that way; the timestamp tokens steer, never reach the text."""
    import ctranslate2  # noqa: F401
    from faster_whisper import WhisperModel
    from faster_whisper.audio import pad_or_trim

    from workers.engines.base import Decoding

    audio = speech["ends_early"]
    fast, _, _ = decode(engine, [audio], Decoding())
    assert len(fast[0]) <= 2, fast  # "The"
    words, segments, _ = decode(engine, [audio], Decoding(timestamps=True))
    assert len(words[0]) >= 50
    assert not any("<|" in s.text for s in segments)
    for seg in segments:
        assert 0.0 <= seg.start <= seg.end <= 30.0
        assert all(seg.start <= w.start <= w.end <= seg.end for w in seg.words)
    ct2 = WhisperModel(str(bundled_model_path()), compute_type="float32", cpu_threads=1)
    features = pad_or_trim(ct2.feature_extractor(audio)[..., :-1])[None]
    result = ct2.model.generate(ct2.encode(features), [[ct2.hf_tokenizer.token_to_id("<|startoftranscript|>")]],
                                beam_size=1, max_initial_timestamp_index=50, suppress_blank=True, suppress_tokens=[-1])
    expected = ct2.hf_tokenizer.decode([t for t in result[0].sequences_ids[0] if t < 50257]).split()
    assert " ".join(s.text for s in segments).split() == expected


@pytest.fixture(scope="module")
def fast_with_a_loop(engine, speech):
    """The fast default on a batch of jfk and the looping window."""
    from workers.engines.base import FAST

    return decode(engine, [speech["jfk"], speech["loops"]], FAST)


def test_a_looping_chunk_is_ended_and_cut_without_holding_up_its_batch(fast_with_a_loop, data_dir):
    """The fast default: the looping chunk stops at its fourth copy instead of running the
    batch to 448 tokens, and keeps its text up to the first copy; the other chunk is untouched."""
    words, _, steps = fast_with_a_loop
    assert steps < 150, steps  # without the guard: 445
    assert wer((data_dir / "jfk.ref.txt").read_text(), " ".join(words[0])) <= 0.1
    text = " ".join(words[1])
    assert text.startswith("When our glorious leader arrives")
    assert text.count("increase the audio volume") == 1 and len(words[1]) < 60, text


def test_temperature_fallback_redoes_only_the_failing_rows(engine, speech, fast_with_a_loop):
    """Whisper's fallback, batched: both rows at temperature 0, then only the looping one,
    sampled; the passing row's words are those of the fast decode."""
    from workers.engines.base import Decoding

    calls = []
    real = engine._generate

    def spy(encoded, *args, **kwargs):
        calls.append((encoded.shape[0], kwargs["temperature"]))
        return real(encoded, *args, **kwargs)

    engine._generate = spy
    try:
        words, segments, _ = decode(engine, [speech["jfk"], speech["loops"]], Decoding(temperatures=(0.0, 1.0)))
    finally:
        del engine._generate
    assert calls == [(2, 0.0), (1, 1.0)]
    assert words[0] == fast_with_a_loop[0][0]
    text = " ".join(words[1])
    assert words[1] and text.count("increase the audio volume") <= 1, text
    assert all(s.avg_logprob >= -1.0 for s in segments if s.chunk == 1)  # the kept decode passed the checks


def test_every_call_is_capped_by_the_token_budget_of_its_longest_audio(engine, speech):
    """As the CTranslate2 engine caps its calls: a 5 s ladder piece beside jfk (11 s) may generate
    no more than 11 s of English needs (``token_budget``), not 448 tokens."""
    from workers.engines.base import FAST, Decoding, token_budget
    from workers.engines.transformers import MAX_LENGTH

    caps = []
    real = engine._generate

    def spy(encoded, prompt, *args, **kwargs):
        caps.append((len(prompt), kwargs["max_new"]))
        return real(encoded, prompt, *args, **kwargs)

    engine._generate = spy
    try:
        for decoding in (FAST, Decoding(timestamps=True)):
            words, _, _ = decode(engine, [speech["jfk"], speech["jfk"][: 5 * 16000]], decoding)
            assert len(words[0]) >= 20, words
    finally:
        del engine._generate
    seconds = speech["jfk"].size / 16000
    assert [cap for _, cap in caps] == [token_budget(seconds, "en", MAX_LENGTH - n) for n, _ in caps]
    assert all(cap < 200 for _, cap in caps)


def test_the_loop_rule_on_token_sequences():
    """``loop_cut``: a tail of 4+ back-to-back copies (24+ tokens) is a loop, cut after its first
    copy; speech-like repeats are not; timestamp tokens count as one. ``_LoopGuard`` forces end of
    text on exactly the rows ``loop_cut`` calls looping."""
    import torch

    from workers.engines.loop_guard import LoopGuard as _LoopGuard, loop_cut

    ts = 50363
    phrase = [300 + k for k in range(9)]
    assert loop_cut(list(range(10, 20)) + phrase * 4, ts) == 10 + 9  # cut after the first copy
    assert loop_cut(list(range(10, 20)) + phrase * 3, ts) is None  # three copies: a chant, not a loop
    assert loop_cut([7] * 23, ts) is None and loop_cut([5] + [7] * 24, ts) == 2  # "no no no ..." x24
    assert loop_cut(list(range(400)), ts) is None
    assert loop_cut([1, 2] * 6 + list(range(100, 150)), ts) is None  # a repeat earlier on is no loop at the end
    segment = lambda k: [ts + 10 * k, 500, 501, 502, 503, ts + 10 * k + 5]  # noqa: E731  <|t|> text <|t'|>, times moving on
    assert loop_cut([600] + [t for k in range(5) for t in segment(k)], ts) == 7
    rng = np.random.default_rng(0)
    rows = []
    for k in range(40):
        head = list(rng.integers(0, 1000, size=int(rng.integers(0, 60))))
        unit = list(rng.integers(0, 1000, size=int(rng.integers(1, 49))))
        rows.append((head + unit * int(rng.integers(1, 7)))[-200:])
    width = max(map(len, rows))
    prompt = [50257, 50362]
    guard = _LoopGuard(len(prompt), 50256, ts)
    ids = torch.tensor([prompt + [1000 + j for j in range(width - len(r))] + r for r in rows])  # distinct left fill
    scores = guard(ids, torch.zeros(len(rows), 51864))
    forced = (scores[:, 50256] == 0) & torch.isinf(scores[:, 0])
    expected = [loop_cut(r, ts) is not None for r in rows]
    assert forced.tolist() == expected and 5 < sum(expected) < 35
