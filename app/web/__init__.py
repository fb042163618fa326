"""The web process (``vtp web``): an aiohttp app that accepts uploads and enqueues jobs.

It is light on purpose: it never imports the speech stack (faster_whisper, ctranslate2,
onnxruntime, torch, transformers) and reaches the workers only through Redis, enqueueing with
``workers.runtime.enqueue`` imported at start-up (which imports no stage).

    server.py    the app factory, middlewares, ``vtp web`` and its safe binding rules (composes only)
    state.py     what the handlers share: WebState, state(), WebLimits, error_response
    auth.py      bearer tokens -> the owner of a job
    origins.py   the Host check (DNS rebinding) and the Origin check (cross-site requests)
    uploads.py   multipart and URL uploads streamed to disk under a size limit, then checked
    api.py       the jobs API (/v1/jobs...), progress as Server-Sent Events
    openai.py    the OpenAI-compatible /v1/audio/transcriptions
    media.py     a job's media by HTTP Range (the upload, a WAV of its audio), signed links, its timeline
    pages.py     the upload form, the jobs list and the job page (static HTML + plain JS)
    metrics.py   /metrics in Prometheus' text format

This module only registers the command, so ``vtp --help`` does not import aiohttp.
"""

from __future__ import annotations

import argparse


def add_command(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("web", help="serve the upload form, the jobs API and the OpenAI-compatible endpoint")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback)")
    w.add_argument("--port", type=int, default=None, help="port (default: $PORT, else 8000)")
    w.add_argument(
        "--insecure", action="store_true",
        help="allow a non-loopback address without VTP_API_TOKENS, and any Host name (anyone who can reach it may submit)",
    )
    w.set_defaults(func=_cmd_web)


def _cmd_web(args: argparse.Namespace, settings) -> int:
    from app.web.server import cmd_web

    return cmd_web(args, settings)
