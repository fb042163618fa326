"""``vtp``: the command line.

    vtp transcribe FILE... [-o DIR]   transcribe here, in this process (no Redis, no GPU)
    vtp worker --queue cpu|gpu        run an arq worker on Redis ($REDIS_URL)
    vtp submit FILE... [--wait]       enqueue on Redis; with --wait, show progress and write outputs
    vtp web [--host H] [--port P]     the web process: upload form, jobs API, OpenAI-compatible endpoint

Errors are one line on stderr (``vtp: error: <file>: <reason>``), never a traceback; the exit
status is 1 if any input failed, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import anyio

from app import errors
from app.cli_options import add_transcribe_options, error, options_from_args, print_summary, unique_basenames
from app.config import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtp", description="Video transcription pipeline.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (to stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("transcribe", help="transcribe media files in this process")
    t.add_argument("inputs", nargs="+", type=Path, metavar="FILE")
    t.add_argument("-o", "--output-dir", type=Path, default=Path("."), help="where outputs go (default: .)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_transcribe_options(t)
    t.set_defaults(func=cmd_transcribe)

    c = sub.add_parser("controller", help="start and stop worker machines from the GPU queue's depth (Fly or Kubernetes)")
    c.add_argument(
        "--backend", choices=["fly", "kubernetes", "keda"], required=True,
        help="where worker machines run (keda: start nothing, only serve the figure on --port for a KEDA ScaledJob)",
    )
    c.add_argument("--port", type=int, default=None, help="serve the last look at the queue as JSON on :PORT/metrics")
    c.set_defaults(func=cmd_controller)

    from app import cli_queue  # the Redis-backed commands live beside, to keep this module local-only

    cli_queue.add_commands(sub)
    from app import web

    web.add_command(sub)
    return parser


def cmd_transcribe(args: argparse.Namespace, settings: Settings) -> int:
    from app.progress import ProgressBar
    from workers.local_runner import LocalRunner

    options = options_from_args(args)
    runner = LocalRunner(settings)
    failed = 0

    async def run_all() -> None:
        nonlocal failed
        for path, base in zip(args.inputs, unique_basenames(args.inputs)):
            bar = ProgressBar(path.name, enabled=not args.quiet)
            try:
                result = await runner.run(path, options, args.output_dir, basename=base, on_progress=bar)
            except errors.VtpError as exc:
                bar.close()
                failed += 1
                if isinstance(exc, errors.OptionsError):
                    error(str(exc))
                    raise  # the same options would fail every other input too
                error(str(exc) if str(exc).startswith(path.name) or str(path) in str(exc) else f"{path}: {exc}")
                continue
            bar.close()
            stats = result.transcript.stats
            unheard = stats.coverage.unheard_seconds
            print_summary(path.name, result.transcript.duration, stats.wall_seconds, result.outputs, unheard)

    try:
        anyio.run(run_all)
    except errors.OptionsError:
        return 2
    return 1 if failed else 0


def cmd_controller(args: argparse.Namespace, settings: Settings) -> int:
    """``vtp controller``: runs until SIGINT/SIGTERM; a rejected token exits 1 with its reason."""
    import asyncio
    import signal

    from workers.controller.loop import Figures, open_backend, run_controller, serve_figures

    logging.getLogger("vtp").setLevel(logging.INFO)

    async def run() -> None:
        backend = open_backend(args.backend, settings)
        task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
        figures = Figures()
        server = await serve_figures(figures, args.port) if args.port else None
        try:
            await run_controller(backend, settings, figures=figures)
        except asyncio.CancelledError:
            pass
        finally:
            if server is not None:
                await server.cleanup()

    asyncio.run(run())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
        return args.func(args, settings)
    except errors.VtpError as exc:
        error(str(exc))
        return 2 if isinstance(exc, errors.OptionsError) else 1
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    except BrokenPipeError:  # `vtp status | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush is quiet too
        return 0


if __name__ == "__main__":
    sys.exit(main())
