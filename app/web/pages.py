"""The browser side: the upload form (``/``), the jobs list (``/jobs``) and the job page (``/jobs/{id}``).

Plain HTML, CSS and one script in ``static/``, no framework and no build step, under the strict
Content-Security-Policy of ``app.web.server`` (scripts and styles from this origin only, no inline
code: positions on the timeline are set through the CSSOM, which that policy allows). The pages
hold no data: the script calls the same API as any client (with the bearer token the user typed,
kept in the browser's localStorage), uploads with XMLHttpRequest for its progress events, follows
``/v1/jobs/{id}/events`` for live progress, and when the job is done plays its media through the
signed links of ``/v1/jobs/{id}/timeline`` (``app.web.media``) beside the transcript, one line per
cue, and the speech timeline.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).with_name("static")


def _page(name: str):
    async def handler(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache", "Content-Type": "text/html"})

    return handler


async def models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the models a client may ask for (OpenAI's list shape)."""
    from app.web.state import state

    names = state(request).settings.model_list
    return web.json_response(
        {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "vtp", "default": i == 0} for i, n in enumerate(names)]}
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", _page("index.html"))
    app.router.add_get("/jobs", _page("jobs.html"))
    app.router.add_get("/jobs/{id}", _page("job.html"))
    app.router.add_get("/v1/models", models)
    app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
