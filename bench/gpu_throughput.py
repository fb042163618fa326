"""GPU throughput of the transformers engine vs the plain transformers ASR pipeline (the peer,
with insanely-fast-whisper's settings), in the same run on the same GPU.

    python bench/gpu_throughput.py [--batch-sizes 8,16,32,64] [--attention sdpa,eager]
                                   [--chunks 128] [--tokens 100] [--write docs/benchmarks.md]
    python bench/gpu_throughput.py --smoke     # a tiny random model on CPU: checks the script runs

**Model.** Whisper large-v3's architecture (32+32 layers, d_model 1280, 128 mel bins, vocabulary
51866) with **random weights** (labelled so in the table): no weights can be downloaded here,
and speed does not depend on the values. Random weights never stop on their own, so every
chunk generates exactly ``--tokens`` tokens (100 by default, about what 30 s of speech yields),
on both sides. fp16, greedy decoding (insanely-fast-whisper's default).

**vtp** = ``TransformersEngine.transcribe_batch`` on ``--chunks`` chunks of 30 s of speech, in
decode batches of each batch size: features, encoder, batched generation, and the word
alignment pass (teacher-forced decoder pass over the alignment heads + DTW), i.e. everything
the GPU worker does per batch; SDPA vs eager attention.

**peer** = ``transformers.pipeline("automatic-speech-recognition")`` on the same speech as one
long input with ``chunk_length_s=30, batch_size=24`` (insanely-fast-whisper's settings; its
chunks overlap, which is part of its cost), SDPA, no timestamps.

x realtime = seconds of audio / wall seconds, after a warm-up batch; peak memory from
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import sys
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
WINDOW_S = 30


def speech(seconds: float) -> np.ndarray:
    """Real speech from the test data, repeated to length (16 kHz float32)."""
    from faster_whisper import decode_audio

    base = decode_audio(str(ROOT / "tests" / "data" / "talk_tts.mp4"))
    reps = int(np.ceil(seconds * 16000 / base.size))
    return np.tile(base, reps)[: int(seconds * 16000)]


def build_model(sizes: dict, device: str, dtype, attention: str, cache: Path):
    """Random weights of the given architecture, saved once (so both systems load the same)."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from workers.engines.ctranslate2 import bundled_model_path

    path = cache / f"random-{sizes['d_model']}x{sizes['decoder_layers']}"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        config = WhisperConfig(
            **sizes, max_source_positions=1500, max_target_positions=448,
            pad_token_id=50257, bos_token_id=50257, eos_token_id=50257, decoder_start_token_id=50258,
        )
        WhisperForConditionalGeneration(config).to(dtype).save_pretrained(path)
        # large-v3's tokenizer is not here; tiny.en's covers the text ids (random ids past it decode to nothing)
        (path / "tokenizer.json").write_bytes((bundled_model_path() / "tokenizer.json").read_bytes())
    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attention)
    return model.to(device).eval(), path


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


def bench_vtp(model, tokenizer, device, dtype, chunks: int, batch: int, tokens: int, audio: np.ndarray) -> tuple[float, float]:
    from workers.engines.transformers import TransformersEngine, _default_alignment_heads

    engine = TransformersEngine(model, tokenizer, "random", device, dtype, _default_alignment_heads(model.config))
    engine.force_tokens = tokens
    options = TranscribeOptions(engine="transformers", beam_size=1, language="en")
    n = WINDOW_S * 16000
    pieces = [audio[i * n : (i + 1) * n] for i in range(chunks)]
    spans = [Chunk(index=i, start=i * WINDOW_S, end=(i + 1) * WINDOW_S) for i in range(chunks)]
    engine.transcribe_batch(pieces[:batch], spans[:batch], options)  # warm-up
    reset_peak()
    started = time.perf_counter()
    for i in range(0, chunks, batch):
        engine.transcribe_batch(pieces[i : i + batch], spans[i : i + batch], options)
    sync()
    return chunks * WINDOW_S / (time.perf_counter() - started), peak_gb()


def bench_peer(model, device, dtype, chunks: int, tokens: int, audio: np.ndarray, batch: int) -> tuple[float, float]:
    from transformers import WhisperFeatureExtractor, WhisperTokenizerFast, pipeline

    from workers.engines.ctranslate2 import bundled_model_path

    tokenizer = WhisperTokenizerFast(tokenizer_file=str(bundled_model_path() / "tokenizer.json"))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="8,16,32,64")
    ap.add_argument("--attention", default="sdpa,eager")
    ap.add_argument("--chunks", type=int, default=128, help="30 s chunks per measurement (default 128 = 64 min)")
    ap.add_argument("--tokens", type=int, default=100, help="generated tokens per chunk, forced")
    ap.add_argument("--peer-batch", type=int, default=24)
    ap.add_argument("--smoke", action="store_true", help="tiny random model on CPU, a few chunks: checks the script")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/vtp-bench-models"))
    ap.add_argument("--write", type=Path, help="replace the gpu_throughput table in this markdown file")
    args = ap.parse_args()

    import torch
    from tokenizers import Tokenizer

    if args.smoke:
        sizes, device, dtype = SMOKE, "cpu", torch.float32
        batches, chunks, tokens, peer_batch = [2, 4], 4, 8, 4
        label = "tiny random model (smoke test), CPU, fp32"
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU: run with --smoke to check the script on CPU")
        sizes, device, dtype = LARGE_V3, "cuda", torch.float16
        batches = [int(b) for b in args.batch_sizes.split(",")]
        chunks, tokens, peer_batch = args.chunks, args.tokens, args.peer_batch
        label = "Whisper large-v3 architecture, **random weights**, fp16"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    audio = speech(chunks * WINDOW_S)
    rows = []
    for attention in args.attention.split(","):
        model, path = build_model(sizes, device, dtype, attention, args.cache)
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        for batch in batches:
            xrt, mem = bench_vtp(model, tokenizer, device, dtype, chunks, batch, tokens, audio)
            rows.append(("vtp transformers engine (+ word alignment)", attention, batch, xrt, mem))
            print(rows[-1], flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    model, _ = build_model(sizes, device, dtype, "sdpa", args.cache)
    xrt, mem = bench_peer(model, device, dtype, chunks, tokens, audio, peer_batch)
    rows.append(("peer: transformers pipeline, chunk_length_s=30 (insanely-fast-whisper settings)", "sdpa", peer_batch, xrt, mem))
    print(rows[-1], flush=True)
    peer = rows[-1][3]

    lines = [
        f"Machine: {gpu}; {machine()}; torch {torch.__version__}. Model: {label}; {tokens} tokens generated per "
        f"30 s chunk (forced), greedy; {chunks} chunks ({chunks * WINDOW_S / 60:.0f} min of audio) per row, after a warm-up. "
        f"Command: `python bench/gpu_throughput.py{' --smoke' if args.smoke else ''} --write docs/benchmarks.md`.",
        "",
        "| system | attention | batch | x realtime | vs peer | peak GPU memory |",
        "|---|---|---|---|---|---|",
    ]
    for system, attention, batch, x, mem in rows:
        lines.append(f"| {system} | {attention} | {batch} | {x:.1f}x | {x / peer:.2f} | {mem:.1f} GiB |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(args.write, "gpu_throughput", "GPU: transformers engine vs the transformers pipeline", table)


if __name__ == "__main__":
    main()
