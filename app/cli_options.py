"""What the ``vtp`` commands share: the transcription options, the one-line error, the summary line.

Both ``app.cli`` (local commands) and ``app.cli_queue`` (the Redis-backed ones) import this module;
it imports neither, so the two stay one-way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.messages import ALL_FORMATS, TranscribeOptions, options_from


def _formats(value: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(v.strip().lower() for v in value.split(",") if v.strip()))
    if "all" in items:
        return ALL_FORMATS
    bad = [v for v in items if v not in ALL_FORMATS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown format(s) {', '.join(bad) or value!r}; choose from {', '.join(ALL_FORMATS)}")
    return items


def add_transcribe_options(p: argparse.ArgumentParser) -> None:
    d = TranscribeOptions()
    g = p.add_argument_group("transcription options")
    g.add_argument("--formats", type=_formats, default=d.formats, help="comma list of txt,srt,vtt,json (default: all)")
    g.add_argument("--model", default=d.model, help="model directory or name (default: the bundled tiny.en)")
    g.add_argument("--engine", default=d.engine, choices=["ctranslate2", "transformers", "noop"],
                   help="speech engine: ctranslate2 (faster-whisper) or transformers (torch; pip install 'vtp[gpu]'); "
                   "noop hears nothing, for benchmarks (default: %(default)s)")
    g.add_argument("--device", default=d.device, choices=["cpu", "cuda", "auto"], help="default: %(default)s")
    g.add_argument("--compute-type", default=d.compute_type, help="CTranslate2 compute type (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="chunks decoded together (default: %(default)s)")
    g.add_argument("--beam-size", type=int, default=d.beam_size, help="beam search width (default: %(default)s)")
    g.add_argument("--language", default=None,
                   help="language code (en, es, fr, ...); default: detected once per file from its first speech "
                   "(English for .en models)")
    g.add_argument("--language-per-chunk", action="store_true",
                   help="with no --language: detect the language of every chunk (media that switches language)")
    g.add_argument("--task", default=d.task, choices=["transcribe", "translate"],
                   help="translate: English text from speech in any language (a multilingual model, e.g. --model base)")
    g.add_argument("--word-timestamps", action="store_true", help="add per-word timings to the JSON output")


def options_from_args(args: argparse.Namespace) -> TranscribeOptions:
    return options_from(
        {
            "engine": args.engine,
            "model": args.model,
            "device": args.device,
            "compute_type": args.compute_type,
            "batch_size": args.batch_size,
            "beam_size": args.beam_size,
            "language": args.language,
            "language_per_chunk": args.language_per_chunk,
            "task": args.task,
            "word_timestamps": args.word_timestamps,
            "formats": list(args.formats),
        }
    )


def unique_basenames(paths: list[Path]) -> list[str]:
    from app.media import safe_basename

    seen: dict[str, int] = {}
    names = []
    for p in paths:
        base = safe_basename(p.name)
        n = seen.get(base, 0) + 1
        seen[base] = n
        names.append(base if n == 1 else f"{base}-{n}")
    return names


def error(message: str) -> None:
    print(f"vtp: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


#: Seconds of unheard speech (``CoverageStats.unheard_seconds``) past which the summary warns.
UNHEARD_WARN_S = 3.0


def summary_line(name: str, duration: float, wall: float, outputs: dict[str, Path]) -> str:
    rtf = duration / wall if wall > 0 else 0.0
    out = ", ".join(str(p) for p in outputs.values())
    return f"{name}: {duration:.1f} s audio in {wall:.1f} s ({rtf:.1f}x realtime) -> {out}"


def print_summary(name: str, duration: float, wall: float, outputs: dict[str, Path], unheard: float) -> None:
    """The one line per input on stdout, then, where speech produced no words, a warning on stderr."""
    print(summary_line(name, duration, wall, outputs), flush=True)
    if unheard > UNHEARD_WARN_S:
        print(f"vtp: warning: {name}: {unheard:.1f} s of speech produced no words (the JSON's `unheard`"
              " spans say where): check them against the media", file=sys.stderr, flush=True)
