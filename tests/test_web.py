"""The web process end to end: a real ``vtp web`` subprocess in front of real workers on a
private redis-server, real ffmpeg and the bundled model on the repository's test media.

One cluster (CPU + GPU worker) and one web process serve the whole module; tests that need
other settings (limits, a dead Redis) start a second web process of their own, which takes
about a second (it loads no model). Webhook receivers and URL-ingest sources are aiohttp
servers on 127.0.0.2, the one address the module's ``VTP_PRIVATE_ALLOWLIST`` lets through, so
every other loopback spelling can be shown refused.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import anyio
import pytest
from aiohttp import web

from tests.support.dag_cluster import free_port
from tests.support.redis_server import RedisServer
from tests.support.dag_cluster import ROOT, Cluster

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

TOKEN_A = "token-a-" + "x" * 24
TOKEN_B = "token-b-" + "y" * 24
SECRET = "whsec_" + base64.b64encode(b"vtp test webhook secret, 32 byte").decode()
RECEIVER_HOST = "127.0.0.2"
WEB_ENV = {
    "VTP_API_TOKENS": f"{TOKEN_A},{TOKEN_B}",
    "VTP_WEBHOOK_SECRET": SECRET,
    "VTP_WEBHOOK_RETRY_DELAY": "0.3",
    "VTP_WEBHOOK_TRIES": "5",
    "VTP_PRIVATE_ALLOWLIST": f"{RECEIVER_HOST}/32",
}
JFK = "ask not what your country can do for you"
SPEECH_STACK = ("faster_whisper", "ctranslate2", "onnxruntime", "torch", "transformers")


@pytest.fixture
def anyio_backend():
    return "asyncio"


class WebProcess:
    def __init__(self, env: dict[str, str], log: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "web", "--port", str(self.port), *extra],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        import socket

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vtp web exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"vtp web did not start:\n{log.read_text()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, data_dir):
    server = RedisServer(free_port(), tmp_path_factory.mktemp("web-redis"), appendonly=False)
    server.start()
    c = Cluster(server.url, tmp_path_factory.mktemp("web"), env=dict(WEB_ENV))
    try:
        c.start_worker("cpu", "cpu-1", concurrency=4)
        c.start_worker("gpu", "gpu-1")
        c.wait_ready(("cpu-1", "cpu"), ("gpu-1", "gpu"))
        yield c
    finally:
        c.close()
        server.kill()


@pytest.fixture(scope="module")
def web_server(cluster):
    w = WebProcess(cluster.env, cluster.work_dir / "web.log")
    try:
        yield w
    finally:
        w.close()


def flat(text: str) -> str:
    return " ".join(text.lower().split())


def auth(token: str = TOKEN_A) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def form(path: Path | None = None, *, filename: str | None = None, data: bytes | None = None, **fields: str) -> aiohttp.FormData:
    f = aiohttp.FormData()
    for k, v in fields.items():
        f.add_field(k, v)
    body = io.BytesIO(data if data is not None else path.read_bytes())
    f.add_field("file", body, filename=filename or (path.name if path else "upload.bin"), content_type="application/octet-stream")
    return f


async def wait_done(session: aiohttp.ClientSession, base: str, job_id: str, token: str = TOKEN_A, timeout: float = 90) -> dict:
    with anyio.fail_after(timeout):
        while True:
            async with session.get(f"{base}/v1/jobs/{job_id}", headers=auth(token)) as r:
                job = await r.json()
            if job["status"] in ("done", "failed", "cancelled"):
                return job
            await anyio.sleep(0.1)


# -- light --------------------------------------------------------------------------------------


def test_web_process_imports_no_speech_stack(tmp_path):
    """The app is built and started (which imports the enqueue client, workers.runtime.enqueue),
    and none of the speech stack is loaded."""
    code = f"""
import asyncio, sys
from aiohttp import web
from app.config import Settings
from app.web.server import create_app

async def main():
    app = create_app(Settings.from_env({{"VTP_DATA_DIR": {str(tmp_path)!r}}}))
    runner = web.AppRunner(app)
    await runner.setup()
    await runner.cleanup()

asyncio.run(main())
bad = [m for m in {SPEECH_STACK!r} if m in sys.modules]
assert "workers.runtime.enqueue" in sys.modules, "the enqueue side was not imported"
assert "workers.runtime.tasks" not in sys.modules and "workers.stages" not in sys.modules
print("LOADED", bad)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTP_")}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "LOADED []" in res.stdout, res.stdout


# -- API round trip ---------------------------------------------------------------------------


async def test_api_round_trip(web_server, data_dir):
    base = web_server.url
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/healthz") as r:
            assert r.status == 200
        async with s.post(f"{base}/v1/jobs", data=form(data_dir / "jfk.flac", formats="txt,srt,vtt,json"), headers=auth()) as r:
            assert r.status == 202, await r.text()
            job = await r.json()
            assert r.headers["Location"] == f"/v1/jobs/{job['id']}"
        assert job["status"] == "queued" and job["input_name"] == "jfk.flac"

        # progress as Server-Sent Events, ending with the final state
        states = []
        async with s.get(f"{base}/v1/jobs/{job['id']}/events", headers=auth()) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                if line.startswith(b"data: "):
                    states.append(json.loads(line[6:])["state"])
        assert states[-1] == "done" and "transcribing" in states

        done = await wait_done(s, base, job["id"])
        assert done["status"] == "done" and done["error"] is None
        assert done["duration"] == pytest.approx(11.0, abs=0.1)
        assert done["realtime_factor"] > 0 and set(done["timings"]) >= {"queue", "extract", "transcribe"}
        assert done["progress"]["fraction"] == 1.0 and done["formats"] == ["json", "srt", "txt", "vtt"]

        async with s.get(f"{base}/v1/jobs/{job['id']}/transcript.txt", headers=auth()) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            assert JFK in flat(await r.text())
        async with s.get(f"{base}/v1/jobs/{job['id']}/transcript.srt", headers=auth()) as r:
            assert r.status == 200 and "-->" in await r.text()
        async with s.get(f"{base}/v1/jobs/{job['id']}/transcript.json", headers=auth()) as r:
            assert (await r.json())["segments"]

        async with s.get(f"{base}/v1/jobs?limit=5", headers=auth()) as r:
            page = await r.json()
            assert job["id"] in [j["id"] for j in page["jobs"]]
        async with s.get(f"{base}/metrics", headers=auth()) as r:
            text = await r.text()
            assert 'vtp_jobs_ended_total{state="done"}' in text and "vtp_queue_depth" in text and "vtp_stage_seconds_sum" in text
            # the GPU worker's batching across jobs (its vtp:gpustats hash, refreshed with its health)
            assert "vtp_gpu_batch_fill_ratio{worker=" in text and "vtp_gpu_decode_batch_size{worker=" in text

        async with s.delete(f"{base}/v1/jobs/{job['id']}", headers=auth()) as r:
            assert r.status == 204
        async with s.get(f"{base}/v1/jobs/{job['id']}", headers=auth()) as r:
            assert r.status == 404


async def test_tokens_isolate_jobs(web_server, data_dir):
    base = web_server.url
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/jobs", data=form(data_dir / "jfk.flac", formats="txt"), headers=auth(TOKEN_A)) as r:
            assert r.status in (200, 202)
            job_id = (await r.json())["id"]
        for method, path in [("GET", ""), ("GET", "/transcript.txt"), ("GET", "/events"), ("DELETE", "")]:
            async with s.request(method, f"{base}/v1/jobs/{job_id}{path}", headers=auth(TOKEN_B)) as r:
                assert r.status == 404, (method, path)
                assert (await r.json())["error"]["type"] == "JobNotFound"
        async with s.get(f"{base}/v1/jobs", headers=auth(TOKEN_B)) as r:
            assert job_id not in [j["id"] for j in (await r.json())["jobs"]]
        async with s.get(f"{base}/v1/jobs/{job_id}") as r:  # no token at all
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        async with s.get(f"{base}/v1/jobs/{job_id}", headers=auth("not-a-token")) as r:
            assert r.status == 401
        # the same media under token B is B's own job, never A's transcript
        async with s.post(f"{base}/v1/jobs", data=form(data_dir / "jfk.flac", formats="txt"), headers=auth(TOKEN_B)) as r:
            assert (await r.json())["id"] != job_id
        assert (await wait_done(s, base, job_id))["status"] == "done"


async def test_media_timeline_and_signed_links_serve_only_the_owner(web_server, data_dir):
    """The upload and its WAV rendition by byte ranges, the timeline (cues, speech, words,
    unheard, links) and the signed links the page's player uses: all for the owner alone, and
    all there although the job asked for TXT only (no VTT, no JSON)."""
    base = web_server.url
    upload = (data_dir / "jfk.flac").read_bytes()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/jobs", data=form(data_dir / "jfk.flac", formats="txt"), headers=auth()) as r:
            job_id = (await r.json())["id"]
        assert (await wait_done(s, base, job_id))["status"] == "done"
        job = f"{base}/v1/jobs/{job_id}"

        async with s.get(f"{job}/media", headers={**auth(), "Range": "bytes=100-1099"}) as r:
            assert r.status == 206 and r.headers["Content-Range"] == f"bytes 100-1099/{len(upload)}"
            assert await r.read() == upload[100:1100] and r.headers["Content-Type"] == "audio/flac"
        async with s.get(f"{job}/media", headers=auth()) as r:
            assert r.status == 200 and await r.read() == upload
        async with s.get(f"{job}/audio.wav", headers={**auth(), "Range": "bytes=0-99"}) as r:
            head = await r.read()
            total = int(r.headers["Content-Range"].rsplit("/", 1)[1])
            assert r.status == 206 and head[:4] == b"RIFF" and head[8:16] == b"WAVEfmt " and len(head) == 100
        assert (total - 44) / 32000 == pytest.approx(11.0, abs=0.1)  # 16 kHz, 16-bit mono: the whole file
        async with s.get(f"{job}/audio.wav", headers={**auth(), "Range": f"bytes={total - 10}-"}) as r:
            assert r.status == 206 and len(await r.read()) == 10
        async with s.get(f"{job}/audio.wav", headers={**auth(), "Range": f"bytes={total}-"}) as r:
            assert r.status == 416

        async with s.get(f"{job}/timeline", headers=auth()) as r:
            tl = await r.json()
        assert JFK in flat(" ".join(c["text"] for c in tl["cues"]))
        assert tl["duration"] == pytest.approx(11.0, abs=0.1) and tl["media_type"] == "audio/flac"
        assert tl["words"] and all(a < b for a, b in tl["words"]) and isinstance(tl["unheard"], list)
        assert isinstance(tl["speech"], list) and set(tl["links"]) == {"media", "audio", "subtitles"}

        # the links work without a token, by ranges too, and only as signed
        async with s.get(base + tl["links"]["media"], headers={"Range": "bytes=0-3"}) as r:
            assert r.status == 206 and await r.read() == upload[:4]
        async with s.get(base + tl["links"]["subtitles"]) as r:
            vtt = await r.text()
            assert r.status == 200 and vtt.startswith("WEBVTT") and "-->" in vtt and "country" in vtt
        async with s.get(base + tl["links"]["audio"], headers={"Range": "bytes=0-3"}) as r:
            assert r.status == 206 and await r.read() == b"RIFF"
        forged = [
            tl["links"]["media"].replace("sig=", "sig=0"),
            tl["links"]["media"].replace("/media?", "/audio.wav?"),  # another file, same signature
            tl["links"]["media"].split("?")[0],
            tl["links"]["media"].replace("exp=", "exp=1"),
        ]
        for link in forged:
            async with s.get(base + link) as r:
                assert r.status == 404, link

        # another token: 404 for every one of them, like a job that does not exist
        for path in ("/media", "/audio.wav", "/timeline"):
            async with s.get(job + path, headers=auth(TOKEN_B)) as r:
                assert r.status == 404, path


async def test_openai_client(web_server, data_dir):
    import openai

    client = openai.AsyncOpenAI(base_url=f"{web_server.url}/v1", api_key=TOKEN_A, max_retries=0, timeout=120)
    with (data_dir / "jfk.flac").open("rb") as f:
        result = await client.audio.transcriptions.create(model="whisper-1", file=f)
    assert JFK in flat(result.text)
    with (data_dir / "jfk.flac").open("rb") as f:
        srt = await client.audio.transcriptions.create(model="tiny.en", file=f, response_format="srt")
    assert "00:00:0" in srt and "-->" in srt
    with (data_dir / "jfk.flac").open("rb") as f:
        verbose = await client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="verbose_json", timestamp_granularities=["word", "segment"]
        )
    assert verbose.duration == pytest.approx(11.0, abs=0.1) and verbose.segments
    assert any(w.word.lower().startswith("country") for w in verbose.words)
    with (data_dir / "jfk.flac").open("rb") as f, pytest.raises(openai.BadRequestError, match="not offered here"):
        await client.audio.transcriptions.create(model="large-v3", file=f)
    bad = openai.AsyncOpenAI(base_url=f"{web_server.url}/v1", api_key="wrong", max_retries=0)
    with (data_dir / "jfk.flac").open("rb") as f, pytest.raises(openai.AuthenticationError):
        await bad.audio.transcriptions.create(model="whisper-1", file=f)
    await client.close()
    await bad.close()


# -- webhooks ---------------------------------------------------------------------------------


class Receiver:
    """A webhook receiver on 127.0.0.2 answering from a script: (status, headers) per request,
    the last one repeated; every request is kept with its arrival time."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script = script
        self.seen: list[tuple[float, dict[str, str], bytes]] = []
        self.strays: list[str] = []
        self.port = free_port()
        self.url = f"http://{RECEIVER_HOST}:{self.port}/hook"

    async def hook(self, request: web.Request) -> web.Response:
        self.seen.append((time.monotonic(), dict(request.headers), await request.read()))
        status, headers = self.script[min(len(self.seen), len(self.script)) - 1]
        return web.Response(status=status, headers=headers, text="ok")

    async def stray(self, request: web.Request) -> web.Response:
        self.strays.append(request.path)
        return web.Response(text="should never be reached")

    async def wait_for(self, n: int, timeout: float = 60) -> None:
        with anyio.fail_after(timeout):
            while len(self.seen) < n:
                await anyio.sleep(0.05)


@pytest.fixture
async def receiver_factory():
    runners = []

    async def start(script, extra_routes=()) -> Receiver:
        rec = Receiver(script)
        app = web.Application()
        app.router.add_post("/hook", rec.hook)
        app.router.add_route("*", "/elsewhere", rec.stray)
        for method, path, handler in extra_routes:
            app.router.add_route(method, path, handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, RECEIVER_HOST, rec.port).start()
        runners.append(runner)
        return rec

    yield start
    for runner in runners:
        await runner.cleanup()


def verify(headers: dict[str, str], body: bytes) -> dict:
    from standardwebhooks.webhooks import Webhook

    return Webhook(SECRET).verify(body, {k.lower(): v for k, v in headers.items()})


async def test_webhook_signed_and_verified(web_server, data_dir, receiver_factory):
    rec = await receiver_factory([(200, {})])
    base = web_server.url
    async with aiohttp.ClientSession() as s:
        data = form(data_dir / "jfk.flac", formats="txt", webhook_url=rec.url)
        async with s.post(f"{base}/v1/jobs", data=data, headers=auth()) as r:
            assert r.status == 202, await r.text()
            job_id = (await r.json())["id"]
        await rec.wait_for(1)
        _, headers, body = rec.seen[0]
        event = verify(headers, body)  # raises unless the signature and timestamp are right
        assert event["type"] == "job.completed" and event["data"]["id"] == job_id
        assert event["data"]["status"] == "done" and headers["webhook-id"] == f"msg_{job_id}"
        with anyio.fail_after(10):
            # The receiver has the event before the worker records the attempt: wait for the record.
            while ((job := await (await s.get(f"{base}/v1/jobs/{job_id}", headers=auth())).json())["webhook"] or {}).get("state") != "delivered":
                await anyio.sleep(0.05)
        assert [a["status"] for a in job["webhook"]["attempts"]] == [200]
        tampered = body.replace(b"job.completed", b"job.completes")
        with pytest.raises(Exception, match="(?i)signature"):
            verify(headers, tampered)


async def test_webhook_retries_with_backoff_and_retry_after(web_server, data_dir, receiver_factory):
    rec = await receiver_factory(
        [(302, {"Location": "/elsewhere"}), (500, {}), (429, {"Retry-After": "1"}), (200, {})]
    )
    base = web_server.url
    async with aiohttp.ClientSession() as s:
        data = form(data_dir / "jfk.flac", formats="txt", webhook_url=rec.url)
        async with s.post(f"{base}/v1/jobs", data=data, headers=auth()) as r:
            job_id = (await r.json())["id"]
        await rec.wait_for(4)
        await anyio.sleep(0.3)
        async with s.get(f"{base}/v1/jobs/{job_id}", headers=auth()) as r:
            delivery = (await r.json())["webhook"]
    assert rec.strays == []  # the 302 was not followed
    ids = {h["webhook-id"] for _, h, _ in rec.seen}
    assert ids == {f"msg_{job_id}"}  # the same id on every attempt
    bodies = {b for _, _, b in rec.seen}
    assert len(bodies) == 1  # and the same event
    for _, headers, body in rec.seen:
        verify(headers, body)
    times = [t for t, _, _ in rec.seen]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # base 0.3 s, doubling, "equal jitter" (half to all of it); then the receiver's Retry-After: 1
    assert 0.14 <= gaps[0] and 0.29 <= gaps[1], gaps
    assert gaps[2] >= 0.95, gaps
    assert delivery["state"] == "delivered"
    assert [a["status"] for a in delivery["attempts"]] == [302, 500, 429, 200]
    assert delivery["attempts"][2]["retry_in"] == 1.0 and delivery["attempts"][3]["retry_in"] == 0


async def test_webhook_of_cancelled_job_given_up_after_tries(web_server, data_dir, receiver_factory):
    rec = await receiver_factory([(503, {})])
    base = web_server.url
    async with aiohttp.ClientSession() as s:
        data = form(data_dir / "ivr_prompts.mp4", formats="txt", webhook_url=rec.url)
        async with s.post(f"{base}/v1/jobs", data=data, headers=auth()) as r:
            job_id = (await r.json())["id"]
        async with s.delete(f"{base}/v1/jobs/{job_id}", headers=auth()) as r:
            assert r.status == 200 and (await r.json())["status"] == "cancelled"
        await rec.wait_for(5, timeout=30)
        with anyio.fail_after(10):
            while ((job := await (await s.get(f"{base}/v1/jobs/{job_id}", headers=auth())).json())["webhook"] or {}).get("state") in (None, "pending"):
                await anyio.sleep(0.05)
    assert verify(rec.seen[0][1], rec.seen[0][2])["type"] == "job.cancelled"
    assert job["webhook"]["state"] == "failed" and len(job["webhook"]["attempts"]) == 5
    await anyio.sleep(1.0)
    assert len(rec.seen) == 5  # no attempt after giving up


# -- limits and hostile input -----------------------------------------------------------------

TOKEN_C = "token-c-" + "z" * 24


@pytest.fixture(scope="module")
def strict_server(cluster):
    """A second web process with tight limits (1 MB, 12 s of media) and its own token."""
    env = {
        **cluster.env, "VTP_API_TOKENS": TOKEN_C, "VTP_MAX_UPLOAD_MB": "1", "VTP_MAX_DURATION": "12",
        # a model the operator offers but no worker has: its jobs fail in the workers
        "VTP_MODELS": "tiny.en,/nonexistent/model",
        # this web process lets all of loopback through, the workers only 127.0.0.2: a name
        # that passed the check at submit time is checked again where it is connected to
        "VTP_PRIVATE_ALLOWLIST": "127.0.0.0/8",
    }
    w = WebProcess(env, cluster.work_dir / "web-strict.log")
    try:
        yield w
    finally:
        w.close()


async def _post(s, base, data, token=TOKEN_C, **kw):
    async with s.post(f"{base}/v1/jobs", data=data, headers=auth(token), **kw) as r:
        body = await r.json()
        return r.status, body


async def test_limits_and_bad_uploads(strict_server, data_dir, tmp_path):
    base = strict_server.url
    async with aiohttp.ClientSession() as s:
        # over the size limit: refused while streaming
        status, body = await _post(s, base, form(data=os.urandom(3 << 20), filename="big.mp4"))
        assert status == 413 and "VTP_MAX_UPLOAD_MB" in body["error"]["message"]
        # over the duration limit (silence.mp4 is 15 s)
        status, body = await _post(s, base, form(data_dir / "silence.mp4"))
        assert status == 413 and body["error"]["type"] == "MediaTooLong"
        assert body["error"]["message"] == "silence.mp4: 15 s of media is over the 12 s limit (VTP_MAX_DURATION)"
        # not media, and media without audio: 415 with a reason
        status, body = await _post(s, base, form(data=b"just some notes, not a video\n" * 20, filename="notes.mp4"))
        assert status == 415 and "not a media file" in body["error"]["message"]
        status, body = await _post(s, base, form(data_dir / "no_audio.mp4"))
        assert status == 415 and "no audio stream" in body["error"]["message"]
        status, body = await _post(s, base, form(data=b"", filename="empty.mp4"))
        assert status == 400 and "empty" in body["error"]["message"]
        # what a client may not choose
        for fields, needle in [
            ({"device": "cuda"}, "unknown field"),
            ({"compute_type": "float16"}, "unknown field"),
            ({"model": "/etc/passwd"}, "not offered"),
            ({"model": "large-v3"}, "not offered"),
            ({"formats": "txt,exe"}, "unknown format"),
            ({"language": "../../x"}, "invalid option"),
        ]:
            status, body = await _post(s, base, form(data_dir / "jfk.flac", **fields))
            assert status == 400 and needle in body["error"]["message"], (fields, body)
        async with s.post(f"{base}/v1/jobs", data=b"raw", headers={**auth(TOKEN_C), "Content-Type": "text/plain"}) as r:
            assert r.status == 415
        # a hostile filename names the job, nothing else (other formats each time: the same
        # media with the same options would join the job already running)
        for raw_name, shown, fmt in [
            (b"../../../../tmp/evil.flac", "evil.flac", b"srt"),
            (rb"..\\..\\windows\\win.ini", "win.ini", b"vtt"),  # escaped in the quoted-string: backslashes arrive
            (b"..%2f..%2fetc%2fx%00%0a.flac", "x_.flac", b"txt"),
        ]:
            raw = (
                b'--BOUNDARY\r\nContent-Disposition: form-data; name="formats"\r\n\r\n' + fmt + b'\r\n'
                b'--BOUNDARY\r\nContent-Disposition: form-data; name="file"; filename="' + raw_name + b'"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n" + (data_dir / "jfk.flac").read_bytes() + b"\r\n--BOUNDARY--\r\n"
            )
            headers = {**auth(TOKEN_C), "Content-Type": "multipart/form-data; boundary=BOUNDARY"}
            async with s.post(f"{base}/v1/jobs", data=raw, headers=headers) as r:
                body = await r.json()
                assert r.status in (200, 202) and body["input_name"] == shown, (raw_name, body)
        assert not Path("/tmp/evil.flac").exists()
        done = await wait_done(s, base, body["id"], token=TOKEN_C)
        async with s.get(f"{base}/v1/jobs/{done['id']}/transcript.txt", headers=auth(TOKEN_C)) as r:
            assert r.headers["Content-Disposition"] == 'attachment; filename="x.txt"'


async def test_webhook_of_failed_job(strict_server, data_dir, receiver_factory):
    rec = await receiver_factory([(204, {})])
    base = strict_server.url
    async with aiohttp.ClientSession() as s:
        data = form(data_dir / "jfk.flac", model="/nonexistent/model", webhook_url=rec.url)
        status, body = await _post(s, base, data)
        assert status == 202, body
        await rec.wait_for(1)
        event = verify(rec.seen[0][1], rec.seen[0][2])
        assert event["type"] == "job.failed" and event["data"]["id"] == body["id"]
        # the GPU workers serve their own VTP_MODELS (tiny.en): they refuse it at once
        assert "'/nonexistent/model' is not served by the GPU workers" in event["data"]["error"]


async def test_webhook_target_checked_again_at_delivery(strict_server, data_dir, receiver_factory):
    """What a DNS-rebinding attacker relies on: a name that was fine when the job was submitted
    and points somewhere refused when the webhook fires. The worker resolves it itself, checks
    the answer and connects only to checked addresses, so the delivery is refused, not made."""
    rec = await receiver_factory([(200, {})])
    base = strict_server.url
    async with aiohttp.ClientSession() as s:
        data = form(data_dir / "jfk.flac", formats="srt", webhook_url=f"http://localhost:{rec.port}/hook")
        status, body = await _post(s, base, data)
        assert status == 202, body
        with anyio.fail_after(60):
            while (job := await (await s.get(f"{base}/v1/jobs/{body['id']}", headers=auth(TOKEN_C))).json())["webhook"] is None:
                await anyio.sleep(0.1)
            while job["webhook"]["state"] == "pending":
                await anyio.sleep(0.1)
                job = await (await s.get(f"{base}/v1/jobs/{body['id']}", headers=auth(TOKEN_C))).json()
    attempts = job["webhook"]["attempts"]
    assert job["webhook"]["state"] == "failed" and len(attempts) == 1  # refused: never retried
    assert attempts[0]["status"] == 0 and "localhost -> 127.0.0.1" in attempts[0]["error"]
    assert rec.seen == []


async def test_ssrf_refused(web_server, data_dir, receiver_factory):
    jfk = (data_dir / "jfk.flac").read_bytes()
    loop_port = free_port()

    async def media(request):
        return web.Response(body=jfk, headers={"Content-Disposition": 'attachment; filename="speech.flac"'})

    async def bounce(request):
        raise web.HTTPFound(f"http://127.1:{loop_port}/secret")

    rec = await receiver_factory([(200, {})], [("GET", "/jfk.flac", media), ("GET", "/bounce", bounce)])
    source = f"http://{RECEIVER_HOST}:{rec.port}"
    refused = [
        f"http://127.1:{loop_port}/x",
        f"http://2130706433:{loop_port}/x",
        f"http://0x7f.1:{loop_port}/x",
        f"http://[::ffff:127.0.0.1]:{loop_port}/x",
        f"http://[::1]:{loop_port}/x",
        f"http://localhost:{loop_port}/x",  # a name that resolves to loopback
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://10.1.2.3/x",
        "http://172.16.0.1/x",
        "http://192.168.1.1/x",
        "http://100.100.100.200/x",
        "http://0.0.0.0:80/x",
        f"{source}/bounce",  # an allowed host redirecting to a refused one
    ]
    base = web_server.url
    async with aiohttp.ClientSession() as s:
        for url in refused:
            async with s.post(f"{base}/v1/jobs", json={"url": url}, headers=auth()) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["type"] == "Forbidden", (url, body)
            if url.endswith("/bounce"):
                continue
            data = form(data_dir / "jfk.flac", webhook_url=url.replace("/x", "/hook"))
            async with s.post(f"{base}/v1/jobs", data=data, headers=auth()) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["type"] == "Forbidden", (url, body)
        for url in ["file:///etc/passwd", "gopher://127.0.0.2/", "http:///nohost"]:
            async with s.post(f"{base}/v1/jobs", json={"url": url}, headers=auth()) as r:
                assert r.status == 400, url
        # the allow-listed address works, for ingest and webhooks alike
        async with s.post(f"{base}/v1/jobs", json={"url": f"{source}/jfk.flac", "formats": ["txt"], "language": "en"}, headers=auth()) as r:
            body = await r.json()
            assert r.status == 202 and body["input_name"] == "speech.flac", body
        done = await wait_done(s, base, body["id"])
        assert done["status"] == "done"


async def test_redis_unreachable_answers_503_fast(tmp_path, data_dir):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VTP_", "REDIS_"))},
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "VTP_DATA_DIR": str(tmp_path / "data"),
    }
    w = WebProcess(env, tmp_path / "web.log")
    try:
        async with aiohttp.ClientSession() as s:
            for method, path, kw in [
                ("POST", "/v1/jobs", {"data": form(data_dir / "jfk.flac")}),
                ("GET", "/v1/jobs", {}),
                ("GET", "/v1/jobs/" + "0" * 32, {}),
                ("GET", "/healthz", {}),
            ]:
                started = time.monotonic()
                async with s.request(method, w.url + path, **kw) as r:
                    assert r.status == 503, (path, await r.text())
                    assert r.headers["Retry-After"] == "5"
                    assert "Redis" in (await r.json())["error"]["message"]
                assert time.monotonic() - started < 3.0, path
    finally:
        w.close()
    assert "serving loopback only" in (tmp_path / "web.log").read_text()


def test_public_bind_without_tokens_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VTP_", "REDIS_"))}
    res = subprocess.run(
        [sys.executable, "-m", "app.cli", "web", "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 2
    assert "without VTP_API_TOKENS" in res.stderr and "--insecure" in res.stderr


# -- the browser --------------------------------------------------------------------------------

#: The README's picture of the job page; a test run rewrites it only when asked (``VTP_SCREENSHOT=1``),
#: so running the tests leaves the working tree clean.
SCREENSHOT = ROOT / "docs" / "job-page.png"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright: the one ``tests/provision.py`` found or installed
    (``make test`` runs it first); none at all fails here with what to install."""
    from playwright.sync_api import sync_playwright

    from provision import chromium

    path = chromium()
    if path is None:
        pytest.fail("no Chromium: run `make provision` (or apt-get install chromium)", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=path, headless=True, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"]
        )
        try:
            yield b
        finally:
            b.close()


def open_page(browser, web_server, *, viewport=(1280, 800), token: str | None = TOKEN_A):
    """A page with ``token`` in its localStorage, as the upload form leaves it (or none)."""
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    if token:
        context.add_init_script(f"localStorage.getItem('vtp-token') || localStorage.setItem('vtp-token', {json.dumps(token)})")
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    # the strict CSP (no inline script or style) is kept: a violation is a console error
    page.on("console", lambda m: "Content Security Policy" in m.text and page.errors.append(m.text))
    return page


def cue_starts(page) -> list[float]:
    return page.locator("#transcript button.cue").evaluate_all("bs => bs.map(b => parseFloat(b.dataset.start))")


def current_time(page) -> float:
    return page.locator("#player").evaluate("m => m.currentTime")


def highlighted(page) -> list[int]:
    return page.locator("#transcript li").evaluate_all(
        "lis => lis.flatMap((li, i) => li.classList.contains('current') ? [i] : [])"
    )


def wait_until(predicate, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_browser_upload_then_the_job_page_plays_beside_a_following_transcript(browser, web_server, data_dir):
    """Upload a short video in the form, follow the job to done, then check it as a user would:
    the third line seeks the player there, the highlight follows playback, the keys move between
    lines, search keeps the lines with the word, downloads and copies work, and a phone-width
    screen has no sideways scrolling."""
    from playwright.sync_api import expect

    page = open_page(browser, web_server, token=None)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=web_server.url)
    page.goto(web_server.url + "/")
    # the API answers 401 without a token: the page opens its token box by itself
    expect(page.locator("#token-box")).to_have_attribute("open", "")
    page.fill("#token", TOKEN_A)
    page.press("#token", "Tab")  # "change": the page keeps the token in localStorage
    upload_via_form(page, web_server.url, data_dir / "talk_tts.mp4")
    expect(page.locator("#state")).to_have_text("done", timeout=120_000)
    assert page.locator("#progress").evaluate("e => e.value") == 1
    expect(page.locator("#transcript")).to_contain_text("vacuum tubes", timeout=10_000)
    starts = cue_starts(page)
    assert len(starts) >= 6 and starts == sorted(starts)
    page.wait_for_function("document.querySelector('#player').readyState >= 1", timeout=15_000)
    # Playwright's own Chromium has no H.264: it gets the audio-only rendition; Debian's plays the upload
    rendition = page.locator("#player").get_attribute("data-rendition")
    assert rendition in ("original", "audio")
    assert page.locator("#player track").get_attribute("src").startswith("/media/")

    # the third line seeks there (and plays)
    page.locator("#transcript button.cue").nth(2).click()
    wait_until(lambda: starts[2] - 0.05 <= current_time(page) < starts[2] + 2, what="the seek to the third cue")
    wait_until(lambda: highlighted(page) == [2], what="the third cue highlighted")
    assert page.locator("#transcript li").nth(2).get_attribute("aria-current") == "true"
    # play across the boundary: the highlight moves to the fourth line
    page.locator("#player").evaluate(f"m => {{ m.currentTime = {starts[3] - 0.5}; m.play(); }}")
    wait_until(lambda: highlighted(page) == [3], timeout=10, what="the highlight to follow playback to the fourth cue")
    assert current_time(page) >= starts[3]

    # the highlighted line is kept in view as playback moves down the list
    page.locator("#player").evaluate(f"m => {{ m.currentTime = {starts[-1] + 0.1}; }}")
    wait_until(lambda: highlighted(page) == [len(starts) - 1], what="the last cue highlighted")
    listed, last = page.locator("#transcript").bounding_box(), page.locator("#transcript li").last.bounding_box()
    assert listed["y"] <= last["y"] and last["y"] + last["height"] <= listed["y"] + listed["height"] + 1
    page.locator("#player").evaluate(f"m => {{ m.currentTime = {starts[3] + 0.1}; }}")
    wait_until(lambda: highlighted(page) == [3], what="back to the fourth cue")

    # keys: space pauses and plays, the arrows move between lines
    page.locator("#transcript button.cue").nth(3).focus()
    page.keyboard.press("Space")
    wait_until(lambda: page.locator("#player").evaluate("m => m.paused"), what="space to pause")
    page.keyboard.press("ArrowDown")
    wait_until(lambda: highlighted(page) == [4], what="ArrowDown to the fifth cue")
    assert abs(current_time(page) - starts[4]) < 0.05
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")
    wait_until(lambda: highlighted(page) == [2], what="ArrowUp twice to the third cue")
    page.keyboard.press("Space")
    wait_until(lambda: not page.locator("#player").evaluate("m => m.paused"), what="space to play")
    page.keyboard.press("Space")

    # search: only the lines with the word stay, the word marked in each
    page.fill("#search", "transistor")
    visible = page.locator("#transcript li:not([hidden])")
    expect(page.locator("#search-count")).to_contain_text(f"of {len(starts)} lines")
    assert 1 <= visible.count() < len(starts)
    assert all(m.lower() == "transistor" for m in page.locator("#transcript li:not([hidden]) mark").all_inner_texts())
    page.fill("#search", "")
    expect(page.locator("#transcript li:not([hidden])")).to_have_count(len(starts))

    # downloads and copies, one of each per format
    expect(page.locator("#downloads a")).to_have_count(4)
    with page.expect_download() as download:
        page.click("#downloads a[data-format=srt]")
    assert download.value.suggested_filename == "talk_tts.srt"
    page.click("#downloads button[data-copy=txt]")
    expect(page.locator("#copied")).to_have_text("TXT copied to the clipboard.")
    assert "vacuum tubes" in page.evaluate("navigator.clipboard.readText()")
    # no price is set on these workers: no "$0.000 per audio hour", but how to set one
    assert "$" not in page.locator("#stats").inner_text() and "VTP_MACHINE_PRICE_HOUR" in page.locator("#stats").inner_text()

    # a phone-width screen: one column, nothing wider than the screen
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    player, cues = page.locator("#player").bounding_box(), page.locator("#transcript").bounding_box()
    assert cues["y"] >= player["y"] + player["height"]  # stacked, not side by side
    assert page.errors == []
    page.context.close()


def mark_unheard(cluster, job_id: str, index: int) -> tuple[float, float]:
    """Make a real job's stored transcript one with speech that produced no words: the cue at
    ``index`` loses its words and its stretch becomes ``unheard`` (still VAD ``speech``)."""
    path = cluster.data_dir / "jobs" / job_id / "review.json"
    doc = json.loads(path.read_text())
    lost = doc["segments"].pop(index)
    span = [lost["start"], lost["end"]]
    speech = doc["speech"] or [[s["start"], s["end"]] for s in doc["segments"]]
    doc["speech"] = sorted(speech + [span])
    doc["unheard"] = [span]
    path.write_text(json.dumps(doc))
    return span[0], span[1]


def test_browser_timeline_marks_unheard_speech_red_and_plays_it(browser, web_server, cluster, data_dir, tmp_path):
    """A real job whose stored transcript has a stretch of speech without words (``mark_unheard``
    writes the coverage stage's ``unheard`` into a real run's transcript): the timeline shows it
    in red, and clicking it plays exactly that stretch. With ``VTP_SCREENSHOT=1`` it writes
    docs/job-page.png for the README (otherwise the picture goes to a temporary folder)."""
    from playwright.sync_api import expect

    page = open_page(browser, web_server)
    job_id = upload_via_form(page, web_server.url, data_dir / "talk_tts.mp4")  # the same job as above, when it ran first
    expect(page.locator("#state")).to_have_text("done", timeout=120_000)
    expect(page.locator("#timeline")).to_be_visible(timeout=10_000)
    expect(page.locator("#timeline .unheard")).to_have_count(0)  # this run heard everything
    a, b = mark_unheard(cluster, job_id, 4)

    page.reload()
    red = page.locator("#timeline .unheard")
    expect(red).to_have_count(1, timeout=10_000)
    expect(page.locator("#unheard-summary")).to_contain_text("1 stretch")
    assert "Speech without words" in red.get_attribute("aria-label")
    bar, box = page.locator("#timeline").bounding_box(), red.bounding_box()
    duration = page.evaluate(f"fetch('/v1/jobs/{job_id}/timeline', {{headers: {{Authorization: 'Bearer {TOKEN_A}'}}}}).then(r => r.json()).then(t => t.duration)")
    assert box["x"] - bar["x"] == pytest.approx(bar["width"] * a / duration, abs=3)  # drawn where it is
    page.wait_for_function("document.querySelector('#player').readyState >= 1", timeout=15_000)
    page.locator("#transcript button.cue").nth(1).click()  # something else highlighted, for the picture
    page.locator("#player").evaluate("m => m.pause()")
    shot = SCREENSHOT if os.environ.get("VTP_SCREENSHOT") == "1" else tmp_path / SCREENSHOT.name
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000  # a picture, not an empty page

    # a transcript without `unheard` (written before the coverage stage filled it): the page
    # draws VAD speech minus the words itself, and finds the same stretch
    path = cluster.data_dir / "jobs" / job_id / "review.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in doc.items() if k != "unheard"}))
    page.reload()
    expect(red).to_have_count(1, timeout=10_000)
    assert red.bounding_box()["x"] == pytest.approx(box["x"], abs=3)  # as drawn from `unheard`, above
    page.wait_for_function("document.querySelector('#player').readyState >= 1", timeout=15_000)

    red.click()  # plays the stretch, and stops at its end
    wait_until(lambda: a - 0.05 <= current_time(page) <= b + 0.5 and not page.locator("#player").evaluate("m => m.paused"),
               what="the red stretch to play")
    wait_until(lambda: page.locator("#player").evaluate("m => m.paused"), timeout=b - a + 10, what="it to stop at its end")
    assert b - 0.1 <= current_time(page) <= b + 1.0
    assert page.errors == []
    page.context.close()


def upload_via_form(page, base: str, path: Path) -> str:
    """Pick ``path`` in the upload form and submit it; the job id, once the job page is open."""
    from playwright.sync_api import expect

    page.goto(base + "/")
    expect(page.locator("#model option")).to_have_count(1)
    page.set_input_files("#file", str(path))
    expect(page.locator("#drop-text")).to_have_text(path.name)
    page.click("#submit")
    page.wait_for_url("**/jobs/*", timeout=30_000)
    return page.url.rsplit("/", 1)[1]


def test_browser_jobs_list_pages_and_shows_live_state(browser, web_server, data_dir):
    """The token's jobs, newest first, a page at a time; a running job's state moves on the page
    without a reload; no price set means no dollar figure."""
    from playwright.sync_api import expect

    page = open_page(browser, web_server, token=TOKEN_B)  # B's jobs: none of this module's other tests reuses them
    page.goto(web_server.url + "/")
    ids = []
    for path, fmt in ((data_dir / "jfk.flac", "srt"), (data_dir / "jfk.flac", "vtt"), (data_dir / "talk_tts.mp4", "srt")):
        r = page.request.post(
            web_server.url + "/v1/jobs", headers=auth(TOKEN_B),
            multipart={"formats": fmt, "word_timestamps": "true", "file": {"name": path.name, "mimeType": "application/octet-stream", "buffer": path.read_bytes()}},
        )
        assert r.status in (200, 202), r.text()
        ids.append(r.json()["id"])
    page.goto(web_server.url + "/jobs?limit=2")
    rows = page.locator("#jobs-body tr")
    expect(rows).to_have_count(2)
    assert rows.nth(0).get_attribute("data-job") == ids[2] and rows.nth(1).get_attribute("data-job") == ids[1]
    newest = page.locator(f"#jobs-body tr[data-job='{ids[2]}'] td.state")
    seen = newest.inner_text()
    # the 65 s talk is still moving when the page first loads; the page follows it to done by itself
    expect(newest).to_have_text("done", timeout=120_000)
    assert seen != "done", "the job was already done when the page loaded: nothing live to see"
    first = rows.nth(0).locator("td")
    assert first.nth(0).inner_text() == "talk_tts.mp4" and first.nth(0).locator("a").get_attribute("href") == f"/jobs/{ids[2]}"
    expect(first.nth(3)).to_have_text(re.compile(r"^[0-9.]+x$"))  # x realtime
    assert re.fullmatch(r"1:0\d", first.nth(2).inner_text()) and first.nth(4).inner_text() == "—"  # duration; cost: no price set
    expect(rows.nth(0).locator("a[data-format=srt]")).to_have_count(1)

    expect(page.locator("#newer")).to_be_hidden()
    page.click("#older")
    page.wait_for_url("**/jobs?offset=2&limit=2")
    expect(rows.first).to_have_attribute("data-job", ids[0])
    expect(page.locator("#newer")).to_be_visible()
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # the table scrolls in its own box
    assert page.errors == []
    page.context.close()


def test_browser_plays_the_audio_rendition_where_the_upload_cannot_play(browser, web_server, data_dir, tmp_path):
    """An AVI (MPEG-4 part 2 video, PCM audio) is nothing Chromium plays: the page plays the
    extract stage's audio as WAV instead, with the same subtitles, and seeking works on it."""
    from playwright.sync_api import expect

    from workers.audio import ffmpeg_exe

    avi = tmp_path / "jfk.avi"
    subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-i", str(data_dir / "jfk.flac"), "-f", "lavfi", "-t", "11",
         "-i", "color=c=blue:s=64x48:r=5", "-map", "1:v", "-map", "0:a", "-c:v", "mpeg4", "-c:a", "pcm_s16le", str(avi)],
        check=True, timeout=60,
    )
    page = open_page(browser, web_server)
    upload_via_form(page, web_server.url, avi)
    expect(page.locator("#state")).to_have_text("done", timeout=120_000)
    expect(page.locator("audio#player[data-rendition=audio]")).to_have_count(1, timeout=10_000)
    assert page.locator("#player").get_attribute("src").split("?")[0].endswith("/audio.wav")
    expect(page.locator("#rendition")).to_contain_text("audio-only")
    page.wait_for_function("document.querySelector('#player').readyState >= 1", timeout=15_000)
    assert page.locator("#player").evaluate("m => m.duration") == pytest.approx(11.0, abs=0.2)
    starts = cue_starts(page)
    assert len(starts) >= 2
    page.locator("#transcript button.cue").last.click()
    wait_until(lambda: starts[-1] - 0.05 <= current_time(page) < starts[-1] + 2, what="the seek on the WAV")
    wait_until(lambda: highlighted(page) == [len(starts) - 1], what="the last cue highlighted")
    assert page.errors == []
    page.context.close()
