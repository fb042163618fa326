"""GPU throughput of the transformers engine vs the plain transformers ASR pipeline (the peer,
with insanely-fast-whisper's settings), in the same run on the same GPU.

    python bench/gpu_throughput.py [--batch-sizes 8,16,32,64] [--attention sdpa,eager]
                                   [--chunks 128] [--tokens 100] [--write docs/benchmarks.md]
    python bench/gpu_throughput.py --smoke     # a tiny random model on CPU: checks the script runs

Sections, in this order (each prints its rows as it goes, and ``--log`` gets them as JSON
lines, so a run cut short keeps what it measured): vtp with the first attention at every batch
size, the peer, batching across jobs, then vtp with the other attentions.

**Model.** Whisper large-v3's architecture (32+32 layers, d_model 1280, 128 mel bins, vocabulary
51866) with **random weights** (labelled so in the table): no weights can be downloaded here,
and speed does not depend on the values. Random weights never stop on their own, so every
chunk generates exactly ``--tokens`` tokens (100 by default, about what 30 s of speech yields),
on both sides. fp16, greedy decoding (insanely-fast-whisper's default).

**vtp** = ``TransformersEngine.transcribe_batch`` on ``--chunks`` chunks of 30 s of speech, in
decode batches of each batch size: features, encoder, batched generation, and the word
alignment pass (teacher-forced decoder pass over the alignment heads + DTW), i.e. everything
the GPU worker does per batch; SDPA vs eager attention. Words are aligned on large-v3's own
10 alignment heads (from its ``generation_config.json``), as a real large-v3 checkpoint is.

**peer** = ``transformers.pipeline("automatic-speech-recognition")`` on the same speech as one
long input with ``chunk_length_s=30, batch_size=24`` (insanely-fast-whisper's settings; its
chunks overlap, which is part of its cost), SDPA, no timestamps.

**Batching across jobs** = 20 one-minute files (two 30 s chunks each) through the GPU
worker's ``GpuBatcher`` from 20 threads at once (as 20 concurrent transcribe jobs hand it their
chunks), vs the same files one after another, each file's chunks in its own model call.

x realtime = seconds of audio / wall seconds, after a warm-up batch; peak memory from
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.messages import Chunk, TranscribeOptions  # noqa: E402
from bench.report import machine, write_section  # noqa: E402

LARGE_V3 = dict(
    d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20, decoder_attention_heads=20,
    encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128, vocab_size=51866,
)
SMOKE = dict(
    d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=128, vocab_size=51866,
)
#: large-v3's alignment heads (its generation_config.json): (decoder layer, head).
LARGE_V3_ALIGNMENT_HEADS = [[7, 0], [10, 17], [12, 18], [13, 12], [16, 1], [17, 14], [19, 11], [21, 4], [24, 1], [25, 6]]
WINDOW_S = 30


def speech(seconds: float, audio: Path | None) -> np.ndarray:
    """Real speech from the test data (or a saved 16 kHz float32/int16 ``.npy``), repeated to length."""
    if audio is not None:
        base = np.load(audio)
        base = base.astype(np.float32) / 32768 if base.dtype == np.int16 else base.astype(np.float32)
    else:
        from faster_whisper import decode_audio

        base = decode_audio(str(ROOT / "tests" / "data" / "talk_tts.mp4"))
    reps = int(np.ceil(seconds * 16000 / base.size))
    return np.tile(base, reps)[: int(seconds * 16000)]


def windows(audio: np.ndarray, count: int, first: int = 0) -> tuple[list[np.ndarray], list[Chunk]]:
    """``count`` consecutive 30 s chunks of ``audio`` from window ``first`` on, timed from 0."""
    n = WINDOW_S * 16000
    pieces = [audio[(first + i) * n : (first + i + 1) * n] for i in range(count)]
    return pieces, [Chunk(index=i, start=i * WINDOW_S, end=(i + 1) * WINDOW_S) for i in range(count)]


def default_tokenizer() -> Path:
    from workers.engines.ctranslate2 import bundled_model_path

    return bundled_model_path() / "tokenizer.json"


def build_model(sizes: dict, device: str, dtype, attention: str, cache: Path, tokenizer: Path):
    """Random weights of the given architecture, saved once (so both systems load the same)."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    path = cache / f"random-{sizes['d_model']}x{sizes['decoder_layers']}"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        config = WhisperConfig(
            **sizes, max_source_positions=1500, max_target_positions=448,
            pad_token_id=50257, bos_token_id=50257, eos_token_id=50257, decoder_start_token_id=50258,
        )
        with torch.device(device):  # random init on the GPU: seconds, not a minute of CPU
            WhisperForConditionalGeneration(config).to(dtype).save_pretrained(path)
        # large-v3's tokenizer is not here; tiny.en's covers the text ids (random ids past it decode to nothing)
        (path / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attention)
    return model.to(device).eval(), path


def heads_for(model) -> list[list[int]]:
    from workers.engines.transformers import _default_alignment_heads

    if model.config.decoder_layers == 32 and model.config.decoder_attention_heads == 20:
        return LARGE_V3_ALIGNMENT_HEADS
    return _default_alignment_heads(model.config)


def make_engine(model, tokenizer, device, dtype, tokens: int):
    from workers.engines.transformers import TransformersEngine

    engine = TransformersEngine(model, tokenizer, "random", device, dtype, heads_for(model))
    engine.force_tokens = tokens
    return engine


def peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_vtp(model, tokenizer, device, dtype, chunks: int, batch: int, tokens: int, audio: np.ndarray,
              beam: int = 1) -> tuple[float, float]:
    engine = make_engine(model, tokenizer, device, dtype, tokens)
    options = TranscribeOptions(engine="transformers", beam_size=beam, language="en")
    pieces, spans = windows(audio, chunks)
    engine.transcribe_batch(pieces[:batch], spans[:batch], options)  # warm-up
    reset_peak()
    started = time.perf_counter()
    for i in range(0, chunks, batch):
        engine.transcribe_batch(pieces[i : i + batch], spans[i : i + batch], options)
    sync()
    return chunks * WINDOW_S / (time.perf_counter() - started), peak_gb()


def phase_seconds(model, tokenizer, device, dtype, batch: int, tokens: int, audio: np.ndarray) -> dict[str, float]:
    """Where one batch's time goes: each step of the engine timed with the GPU synchronised."""
    import workers.engines.transformers as hf

    engine = make_engine(model, tokenizer, device, dtype, tokens)
    options = TranscribeOptions(engine="transformers", beam_size=1, language="en")
    pieces, spans = windows(audio, batch)
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

    saved = (hf.log_mel, hf.dtw_batch, hf.TransformersEngine._generate, hf.TransformersEngine._score)
    encoder = model.model.encoder
    original_forward = encoder.forward
    try:
        hf.log_mel = timed("features", hf.log_mel)
        hf.dtw_batch = timed("dtw", hf.dtw_batch)
        hf.TransformersEngine._generate = timed("generate", hf.TransformersEngine._generate)
        hf.TransformersEngine._score = timed("score (teacher-forced pass)", hf.TransformersEngine._score)
        encoder.forward = timed("encoder", original_forward)
        sync()
        t = time.perf_counter()
        engine.transcribe_batch(pieces, spans, options)
        sync()
        spent["total"] = time.perf_counter() - t
    finally:
        hf.log_mel, hf.dtw_batch, hf.TransformersEngine._generate, hf.TransformersEngine._score = saved
        encoder.forward = original_forward
    return {k: round(v, 3) for k, v in spent.items()}


def bench_peer(model, device, dtype, chunks: int, tokens: int, audio: np.ndarray, batch: int,
               tokenizer_file: Path) -> tuple[float, float]:
    from transformers import WhisperFeatureExtractor, WhisperTokenizerFast, pipeline

    tokenizer = WhisperTokenizerFast(tokenizer_file=str(tokenizer_file))
    tokenizer.pad_token = "<|endoftext|>"
    asr = pipeline(
        "automatic-speech-recognition",
        model=model,
        tokenizer=tokenizer,
        feature_extractor=WhisperFeatureExtractor(feature_size=model.config.num_mel_bins),
        dtype=dtype,
        device=device,
    )
    kwargs = dict(chunk_length_s=30, batch_size=batch, return_timestamps=False,
                  generate_kwargs={"min_new_tokens": tokens, "max_new_tokens": tokens})
    total = audio[: chunks * WINDOW_S * 16000]
    asr(audio[: batch * WINDOW_S * 16000].copy(), **kwargs)  # warm-up
    reset_peak()
    started = time.perf_counter()
    asr(total.copy(), **kwargs)
    sync()
    return total.size / 16000 / (time.perf_counter() - started), peak_gb()


def oom_check(model, tokenizer, device, dtype, tokens: int, audio: np.ndarray, batch: int, beam: int,
              fraction: float) -> dict:
    """A card smaller than the batch asks for (the process held to ``fraction`` of the GPU's memory):
    the engine must halve its model calls until they fit, and finish the batch."""
    import torch

    engine = make_engine(model, tokenizer, device, dtype, tokens)
    options = TranscribeOptions(engine="transformers", beam_size=beam, language="en")
    pieces, spans = windows(audio, batch)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        started = time.perf_counter()
        segments, _ = engine.transcribe_batch(pieces, spans, options)
        sync()
        return {"batch": batch, "beam": beam, "memory_fraction": fraction, "gib_allowed": round(
            fraction * torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            "settled_sequences": engine.max_sequences, "cues": len(segments),
            "seconds": round(time.perf_counter() - started, 2)}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def bench_jobs(model, tokenizer, device, dtype, tokens: int, audio: np.ndarray, files: int, batch: int) -> dict:
    """``files`` one-minute files: through one GpuBatcher from a thread each, vs one after another."""
    from workers.batcher import GpuBatcher

    engine = make_engine(model, tokenizer, device, dtype, tokens)
    options = TranscribeOptions(engine="transformers", beam_size=1, language="en")
    jobs = [windows(audio, 2, first=2 * f) for f in range(files)]  # each file its own cut of the speech
    engine.transcribe_batch(*jobs[0], options)  # warm-up
    sync()
    started = time.perf_counter()
    for pieces, spans in jobs:
        engine.transcribe_batch(pieces, spans, options)
    sync()
    one_after_another = time.perf_counter() - started

    batcher = GpuBatcher(engine, batch_size=batch, max_wait_ms=30)
    threads = [threading.Thread(target=batcher.transcribe_batch, args=(*job, options)) for job in jobs]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sync()
    together = time.perf_counter() - started
    batcher.close()
    audio_s = files * 2 * WINDOW_S
    return {
        "files": files, "decode_batch": batch,
        "one_after_another_xrt": audio_s / one_after_another, "together_xrt": audio_s / together,
        "gain": one_after_another / together, "stats": batcher.stats.as_dict(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="8,16,32,64")
    ap.add_argument("--attention", default="sdpa,eager", help="the first gets the peer and the jobs section beside it")
    ap.add_argument("--chunks", type=int, default=128, help="30 s chunks per measurement (default 128 = 64 min)")
    ap.add_argument("--tokens", type=int, default=100, help="generated tokens per chunk, forced")
    ap.add_argument("--peer-batch", type=int, default=24, help="0: no peer section")
    ap.add_argument("--beam", type=int, default=1, help="vtp's beam size (the peer is greedy, as insanely-fast-whisper)")
    ap.add_argument("--oom-check", type=float, default=0.0,
                    help="fraction of GPU memory: decode the largest batch within it (the engine halves calls that run out)")
    ap.add_argument("--jobs", type=int, default=20, help="one-minute files for the batching-across-jobs section (0: skip)")
    ap.add_argument("--jobs-batch", type=int, default=32, help="the batcher's decode batch in that section")
    ap.add_argument("--audio", type=Path, help="16 kHz speech as .npy (default: decode tests/data/talk_tts.mp4)")
    ap.add_argument("--tokenizer", type=Path, help="a Whisper tokenizer.json (default: the bundled tiny.en's)")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds: start no new section past this")
    ap.add_argument("--log", type=Path, help="append every measurement here as a JSON line")
    ap.add_argument("--smoke", action="store_true", help="tiny random model on CPU, a few chunks: checks the script")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/vtp-bench-models"))
    ap.add_argument("--write", type=Path, help="replace the gpu_throughput table in this markdown file")
    args = ap.parse_args()
    began = time.monotonic()

    import torch
    from tokenizers import Tokenizer

    if args.smoke:
        sizes, device, dtype = SMOKE, "cpu", torch.float32
        batches, chunks, tokens, peer_batch = [2, 4], 4, 8, 4
        files, jobs_batch = min(args.jobs, 4), 4
        label = "tiny random model (smoke test), CPU, fp32"
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU: run with --smoke to check the script on CPU")
        sizes, device, dtype = LARGE_V3, "cuda", torch.float16
        batches = [int(b) for b in args.batch_sizes.split(",")]
        chunks, tokens, peer_batch = args.chunks, args.tokens, args.peer_batch
        files, jobs_batch = args.jobs, args.jobs_batch
        label = "Whisper large-v3 architecture, **random weights**, fp16"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    tokenizer_file = args.tokenizer or default_tokenizer()
    audio = speech(max(chunks, 2 * files) * WINDOW_S, args.audio)
    rows: list[tuple] = []
    jobs: dict | None = None

    def record(entry: dict) -> None:
        print(json.dumps(entry), flush=True)
        if args.log:
            with args.log.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def over_budget(section: str) -> bool:
        if time.monotonic() - began > args.budget:
            record({"skipped": section, "reason": f"past the {args.budget:.0f} s budget"})
            return True
        return False

    def vtp_rows(attention: str) -> None:
        model, path = build_model(sizes, device, dtype, attention, args.cache, tokenizer_file)
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        for batch in batches:
            if over_budget(f"vtp {attention} batch {batch}"):
                break
            xrt, mem = bench_vtp(model, tokenizer, device, dtype, chunks, batch, tokens, audio, args.beam)
            system = "vtp transformers engine (+ word alignment)" + (f", beam {args.beam}" if args.beam > 1 else "")
            rows.append((system, attention, batch, xrt, mem))
            record({"system": "vtp", "attention": attention, "batch": batch, "beam": args.beam, "xrt": xrt, "peak_gib": mem})
        if args.oom_check and attention == attentions[0] and device == "cuda" and not over_budget("oom"):
            record({"oom_check": oom_check(model, tokenizer, device, dtype, tokens, audio, max(batches), args.beam,
                                           args.oom_check)})
        if attention == attentions[0] and not over_budget("phases"):
            record({"phases": attention, "batch": max(batches),
                    "seconds": phase_seconds(model, tokenizer, device, dtype, max(batches), tokens, audio)})
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

    def section(name: str, fn) -> None:
        """One section; a failure is recorded and the next section still runs (one device lease)."""
        if over_budget(name):
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - report it, keep measuring
            import traceback

            traceback.print_exc()
            record({"failed": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
        if device == "cuda":
            torch.cuda.empty_cache()

    def peer_and_jobs() -> None:
        nonlocal jobs
        model, path = build_model(sizes, device, dtype, "sdpa", args.cache, tokenizer_file)
        xrt, mem = bench_peer(model, device, dtype, chunks, tokens, audio, peer_batch, tokenizer_file)
        rows.append(("peer: transformers pipeline, chunk_length_s=30 (insanely-fast-whisper settings)", "sdpa", peer_batch, xrt, mem))
        record({"system": "peer", "attention": "sdpa", "batch": peer_batch, "xrt": xrt, "peak_gib": mem})
        if files and not over_budget("jobs"):
            jobs = bench_jobs(model, Tokenizer.from_file(str(path / "tokenizer.json")), device, dtype, tokens, audio,
                              files, jobs_batch)
            record({"section": "batching_across_jobs", **jobs})

    attentions = args.attention.split(",")
    section(f"vtp {attentions[0]}", lambda: vtp_rows(attentions[0]))
    if peer_batch:
        section("peer", peer_and_jobs)
    for attention in attentions[1:]:
        section(f"vtp {attention}", lambda attention=attention: vtp_rows(attention))

    peers = [r[3] for r in rows if r[0].startswith("peer")]
    peer = peers[0] if peers else float("nan")
    lines = [
        f"Machine: {gpu}; {machine()}; torch {torch.__version__}. Model: {label}; {tokens} tokens generated per "
        f"30 s chunk (forced), {'greedy' if args.beam == 1 else f'vtp at beam {args.beam}, the peer greedy'}; {chunks} chunks ({chunks * WINDOW_S / 60:.0f} min of audio) per row, after a warm-up. "
        f"Command: `python bench/gpu_throughput.py{' --smoke' if args.smoke else ''} --write docs/benchmarks.md`.",
        "",
        "| system | attention | batch | x realtime | vs peer | peak GPU memory |",
        "|---|---|---|---|---|---|",
    ]
    for system, attention, batch, x, mem in rows:
        lines.append(f"| {system} | {attention} | {batch} | {x:.1f}x | {x / peer:.2f} | {mem:.1f} GiB |")
    if jobs:
        st = jobs["stats"]
        lines += [
            "",
            f"Batching across jobs, same model: {jobs['files']} one-minute files (two 30 s chunks each), "
            f"decode batch {jobs['decode_batch']}.",
            "",
            "| submitted | x realtime | throughput vs one after another | decode batches | shared by jobs | fill ratio |",
            "|---|---|---|---|---|---|",
            f"| one after another (each file's chunks in its own model call) | {jobs['one_after_another_xrt']:.1f}x | 1.00 | "
            f"{jobs['files']} | 0 | {2 / jobs['decode_batch']:.2f} |",
            f"| together, through one GpuBatcher | {jobs['together_xrt']:.1f}x | {jobs['gain']:.2f} | "
            f"{st['batches']} | {st['shared_batches']} | {st['fill_ratio']:.2f} |",
        ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(args.write, "gpu_throughput", "GPU: transformers engine vs the transformers pipeline", table)


if __name__ == "__main__":
    main()
