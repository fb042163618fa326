"""The web process under hostile or unlucky conditions (issue 20): DNS rebinding and cross-site
requests, a quiet progress stream, form fields split across reads and stalled clients, retried
OpenAI requests, a Redis that dies mid-submit, the metrics' cost and scope, unknown languages.

The app runs in this process behind aiohttp's real server on a loopback port, in front of a
private redis-server, with no workers: a job stays ``queued``, which is what most of these
need. Its timeouts are test-sized through ``WebLimits`` (the defaults are minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import anyio
import pytest
from aiohttp import web

from tests.support.dag_cluster import free_port
from tests.support.dag_cluster import ROOT

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

TOKEN = "token-h-" + "q" * 24


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Served:
    def __init__(self, app: web.Application, port: int, data_dir: Path) -> None:
        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.data_dir = data_dir

    @property
    def state(self):
        from app.web.server import STATE

        return self.app[STATE]

    def stored(self) -> list[Path]:
        """Every file in the artifact storage."""
        return sorted(p for p in self.data_dir.rglob("*") if p.is_file())


@contextlib.asynccontextmanager
async def serve(redis_url: str, tmp_path: Path, *, tokens: str = "", any_host: bool = False, **limits):
    from app.config import Settings
    from app.web.server import WebLimits, create_app

    data = tmp_path / "data"
    env = {"REDIS_URL": redis_url, "VTP_DATA_DIR": str(data), "VTP_API_TOKENS": tokens}
    app = create_app(
        Settings.from_env(env), spool_dir=tmp_path / "spool", limits=WebLimits(**limits), any_host=any_host
    )
    # shutdown_timeout: a stalled test client's connection is not waited for at the end
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Served(app, port, data)
    finally:
        await runner.cleanup()


def form(path: Path, **fields: str) -> aiohttp.FormData:
    f = aiohttp.FormData()
    for k, v in fields.items():
        f.add_field(k, v)
    f.add_field("file", io.BytesIO(path.read_bytes()), filename=path.name, content_type="application/octet-stream")
    return f


# -- item 4: DNS rebinding and cross-site requests -------------------------------------------------


async def test_tokenless_server_answers_only_loopback_host_names(redis_url, tmp_path):
    async with serve(redis_url, tmp_path) as srv, aiohttp.ClientSession() as s:
        for host in ("attacker.example", f"attacker.example:{srv.port}", "192.168.1.10", "localhost.attacker.example"):
            for path in ("/v1/jobs", "/", "/healthz"):
                async with s.get(srv.url + path, headers={"Host": host}) as r:
                    assert r.status == 421, (host, path)
                    body = await r.json()
                    assert body["error"]["type"] == "MisdirectedHost" and "loopback" in body["error"]["message"]
        for host in (f"localhost:{srv.port}", f"127.0.0.1:{srv.port}", f"[::1]:{srv.port}", "localhost", "LOCALHOST."):
            async with s.get(srv.url + "/v1/jobs", headers={"Host": host}) as r:
                assert r.status == 200, host
    # with --insecure (a tokenless server on a public address) any name is served, as documented
    async with serve(redis_url, tmp_path, any_host=True) as srv, aiohttp.ClientSession() as s:
        async with s.get(srv.url + "/v1/jobs", headers={"Host": "vtp.lan:8000"}) as r:
            assert r.status == 200
    # with tokens the token is what counts, whatever the name
    async with serve(redis_url, tmp_path, tokens=TOKEN) as srv, aiohttp.ClientSession() as s:
        async with s.get(srv.url + "/v1/jobs", headers={"Host": "vtp.example.org", "Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200


async def test_cross_site_requests_refused_in_every_mode(redis_url, tmp_path, data_dir):
    jfk = data_dir / "jfk.flac"
    for tokens in ("", TOKEN):
        auth = {"Authorization": f"Bearer {TOKEN}"} if tokens else {}
        async with serve(redis_url, tmp_path, tokens=tokens) as srv, aiohttp.ClientSession() as s:
            own = f"http://127.0.0.1:{srv.port}"
            for headers in (
                {"Origin": "http://attacker.example"},
                {"Origin": f"http://attacker.example:{srv.port}"},
                {"Origin": "null"},
                {"Origin": f"http://localhost:{srv.port + 1}"},
                {"Sec-Fetch-Site": "cross-site"},
                {"Origin": own, "Sec-Fetch-Site": "cross-site"},
            ):
                for path in ("/v1/jobs", "/v1/audio/transcriptions"):
                    async with s.post(srv.url + path, data=form(jfk, formats="txt"), headers={**auth, **headers}) as r:
                        assert r.status == 403, (tokens, headers, path)
                        assert (await r.json())["error"]["type"] == "CrossOrigin"
            # the same request from the server's own page is accepted, and so is one with no
            # Origin at all (curl, the SDKs: not a browser)
            for headers in ({"Origin": own, "Sec-Fetch-Site": "same-origin"}, {}):
                async with s.post(srv.url + "/v1/jobs", data=form(jfk, formats="txt"), headers={**auth, **headers}) as r:
                    assert r.status in (200, 202), (tokens, headers, await r.text())
                    job_id = (await r.json())["id"]
            async with s.delete(f"{srv.url}/v1/jobs/{job_id}", headers={**auth, "Origin": "http://attacker.example"}) as r:
                assert r.status == 403
            async with s.get(f"{srv.url}/v1/jobs/{job_id}", headers=auth) as r:
                assert (await r.json())["status"] == "queued"  # the refused DELETE changed nothing
            async with s.delete(f"{srv.url}/v1/jobs/{job_id}", headers={**auth, "Origin": own}) as r:
                assert r.status == 200 and (await r.json())["status"] == "cancelled"
            # no ambient authority: nothing here ever sets a cookie
            for path in ("/", f"/jobs/{job_id}", "/static/vtp.js", "/v1/jobs", "/v1/models"):
                async with s.get(srv.url + path, headers=auth) as r:
                    assert "Set-Cookie" not in r.headers, path
            assert not s.cookie_jar or len(s.cookie_jar) == 0


CHROMIUM = "/usr/bin/chromium"


def test_browser_form_works_tokenless_and_cross_site_post_does_not(redis_url, tmp_path, data_dir):
    """The tokenless form in headless Chromium: its own upload and its Cancel button (both
    carry the page's Origin) work; a form on another origin that posts to the server is refused."""
    from playwright.sync_api import expect, sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does it)", pytrace=False)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VTP_", "REDIS_"))},
        "REDIS_URL": redis_url, "VTP_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT),
    }
    log = tmp_path / "web.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "web", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    attacker_port = free_port()
    attacker_dir = tmp_path / "attacker"
    attacker_dir.mkdir()
    (attacker_dir / "index.html").write_text(
        f'<form id=f method=post enctype="multipart/form-data" action="http://127.0.0.1:{port}/v1/jobs">'
        '<input name=formats value=txt><input type=file name=file id=file></form>'
    )
    attacker = subprocess.Popen([sys.executable, "-m", "http.server", str(attacker_port), "--bind", "127.0.0.2"],
                                cwd=attacker_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                socket.create_connection(("127.0.0.2", attacker_port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"http://127.0.0.1:{port}/")
                page.set_input_files("#file", str(data_dir / "jfk.flac"))
                page.click("#submit")
                page.wait_for_url("**/jobs/*", timeout=20_000)
                expect(page.locator("#state")).to_have_text("queued", timeout=10_000)  # no workers here
                page.click("#cancel")
                expect(page.locator("#state")).to_have_text("cancelled", timeout=10_000)
                assert errors == []

                # another site's page submits a form to the server: refused, no job made
                page.goto(f"http://127.0.0.2:{attacker_port}/index.html")
                page.set_input_files("#file", str(data_dir / "jfk.flac"))
                with page.expect_navigation():
                    page.evaluate("document.getElementById('f').submit()")
                body = json.loads(page.locator("body").inner_text())
                assert body["error"]["type"] == "CrossOrigin", body
            finally:
                browser.close()
        import redis

        r = redis.Redis.from_url(redis_url)
        assert r.zcard("vtp:jobs") == 1  # the form's own job only
        r.close()
    finally:
        attacker.terminate()
        attacker.wait(10)
        proc.terminate()
        proc.wait(10)


# -- item 5: a quiet progress stream stays open ----------------------------------------------------


async def test_progress_stream_of_a_queued_job_stays_open_with_keepalives(redis_url, tmp_path, data_dir):
    """A job nobody works on: its stream gets keep-alive comments and no error, well past the
    point where a blocking read as long as the socket timeout used to fail it (after
    ``stream_reconnect_s`` of such reads: 2 minutes at the defaults, 2 s here)."""
    limits = dict(redis_socket_s=1.0, stream_poll_s=0.3, stream_reconnect_s=2.0)
    async with serve(redis_url, tmp_path, **limits) as srv, aiohttp.ClientSession() as s:
        async with s.post(srv.url + "/v1/jobs", data=form(data_dir / "jfk.flac", formats="txt")) as r:
            job_id = (await r.json())["id"]
        lines: list[bytes] = []
        started = time.monotonic()
        async with s.get(f"{srv.url}/v1/jobs/{job_id}/events") as r:
            assert r.status == 200
            with anyio.move_on_after(6.0):  # 6 x the socket timeout, 3 x the old failure point
                async for line in r.content:
                    lines.append(line)
            assert not r.content.at_eof(), b"".join(lines)  # still open
        assert time.monotonic() - started >= 5.9
    text = b"".join(lines).decode()
    assert "event: error" not in text, text
    assert text.count(": keep-alive") >= 10, text
    assert '"state":"queued"' in text


def test_stream_poll_must_be_shorter_than_the_socket_timeout():
    from app.web.server import WebLimits

    with pytest.raises(ValueError, match="shorter than redis_socket_s"):
        WebLimits(redis_socket_s=10.0, stream_poll_s=10.0)


# -- item 8: multipart fields split across reads, stalled clients -----------------------------------


async def _raw_request(port: int, parts: list[bytes], pause: float = 0.3, read_timeout: float = 10.0) -> tuple[int, bytes, float]:
    """Send ``parts`` as separate TCP writes ``pause`` apart; (status, body, seconds to the answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    started = time.monotonic()
    try:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()
        with anyio.fail_after(read_timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            elapsed = time.monotonic() - started
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            body = await reader.readexactly(length)
        return int(head.split()[1]), body, elapsed
    finally:
        writer.close()


def _multipart_head(port: int, body_length: int) -> bytes:
    return (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary=BOUNDARY\r\n"
        f"Content-Length: {body_length}\r\n\r\n"
    ).encode()


async def test_form_field_split_across_reads_is_read_whole(redis_url, tmp_path, data_dir):
    media = (data_dir / "jfk.flac").read_bytes()
    field = b'--BOUNDARY\r\nContent-Disposition: form-data; name="formats"\r\n\r\n'
    value = b"srt,vtt"
    rest = (
        b'\r\n--BOUNDARY\r\nContent-Disposition: form-data; name="file"; filename="jfk.flac"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + media + b"\r\n--BOUNDARY--\r\n"
    )
    body = field + value + rest
    async with serve(redis_url, tmp_path) as srv:
        # the field's value arrives in two reads: "sr", then "t,vtt" and the rest
        status, answer, _ = await _raw_request(srv.port, [_multipart_head(srv.port, len(body)) + field + value[:2], value[2:] + rest])
        assert status == 202, answer
        record = await srv.state.store.get(json.loads(answer)["id"])
        assert record.options.formats == ("srt", "vtt")


async def test_stalled_clients_get_408_quickly(redis_url, tmp_path, data_dir):
    media = (data_dir / "jfk.flac").read_bytes()
    field = b'--BOUNDARY\r\nContent-Disposition: form-data; name="formats"\r\n\r\n'
    file_head = b'\r\n--BOUNDARY\r\nContent-Disposition: form-data; name="file"; filename="jfk.flac"\r\n\r\n'
    full = field + b"txt" + file_head + media + b"\r\n--BOUNDARY--\r\n"
    stalls = {
        "in a field": field + b"tx",
        "in a part's headers": b'--BOUNDARY\r\nContent-Disposition: form-da',
        "in the file": field + b"txt" + file_head + media[:5000],
    }
    async with serve(redis_url, tmp_path, idle_s=1.0) as srv:
        for what, sent in stalls.items():
            status, answer, elapsed = await _raw_request(srv.port, [_multipart_head(srv.port, len(full)) + sent])
            assert status == 408, (what, answer)
            assert json.loads(answer)["error"]["type"] == "UploadStalled"
            assert 0.9 <= elapsed < 3.0, (what, elapsed)
        # a JSON body that stops half way
        body = b'{"url": "http://example.com/a.mp4"}'
        head = (
            f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        status, answer, elapsed = await _raw_request(srv.port, [head + body[:10]])
        assert status == 408 and elapsed < 3.0, answer
        assert srv.stored() == []  # nothing of a stalled upload is kept


# -- item 10: the OpenAI endpoint repeats no work -------------------------------------------------


async def test_openai_retries_join_one_job_and_gone_clients_stop_waiting(redis_url, tmp_path, data_dir):
    """The official SDK times out (no workers: the job stays queued) and retries twice. All three
    requests are one job; once the SDK has given up, no request is still waiting."""
    import openai

    async with serve(redis_url, tmp_path, openai_poll_s=0.1) as srv:
        client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=2, timeout=1.0)
        with (data_dir / "jfk.flac").open("rb") as f, pytest.raises(openai.APITimeoutError):
            await client.audio.transcriptions.create(model="whisper-1", file=f)
        await client.close()
        st = srv.state
        tries = sum(n for (method, route, _), n in st.requests.items() if route == "/v1/audio/transcriptions")
        with anyio.fail_after(3):
            while tries < 3 or st.openai_waiting:
                await anyio.sleep(0.05)
                tries = sum(n for (method, route, _), n in st.requests.items() if route == "/v1/audio/transcriptions")
        assert tries == 3  # the first try and two retries reached the server
        async with aiohttp.ClientSession() as s:
            async with s.get(srv.url + "/v1/jobs") as r:
                jobs = (await r.json())["jobs"]
            assert len(jobs) == 1 and jobs[0]["status"] == "queued", jobs
            async with s.get(srv.url + "/metrics") as r:
                assert "vtp_web_openai_waiting 0" in await r.text()
            # two identical requests at once are one job too (checked again when the record is made)
            await (await s.delete(f"{srv.url}/v1/jobs/{jobs[0]['id']}")).release()

            async def post() -> None:
                with contextlib.suppress(asyncio.TimeoutError, aiohttp.ClientError):
                    async with s.post(srv.url + "/v1/audio/transcriptions", data=form(data_dir / "jfk.flac", model="whisper-1"),
                                      timeout=aiohttp.ClientTimeout(total=1.5)) as r:
                        await r.read()

            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(post)
            async with s.get(srv.url + "/v1/jobs") as r:
                jobs = (await r.json())["jobs"]
            # the cancelled job is not joined: one new job for the four requests
            assert sorted(j["status"] for j in jobs) == ["cancelled", "queued"], jobs
        with anyio.fail_after(3):
            while st.openai_waiting:
                await anyio.sleep(0.05)


async def test_same_media_joins_the_running_job_unless_the_request_names_itself(redis_url, tmp_path, data_dir):
    async with serve(redis_url, tmp_path) as srv, aiohttp.ClientSession() as s:
        jfk = data_dir / "jfk.flac"
        async with s.post(srv.url + "/v1/jobs", data=form(jfk, formats="txt")) as r:
            assert r.status == 202
            first = (await r.json())["id"]
        async with s.post(srv.url + "/v1/jobs", data=form(jfk, formats="txt")) as r:
            assert r.status == 200 and (await r.json())["id"] == first  # joined while queued
        async with s.post(srv.url + "/v1/jobs", data=form(jfk, formats="srt")) as r:
            assert r.status == 202 and (await r.json())["id"] != first  # other options: its own job
        keyed = set()
        for key in ("k1", "k2", "k1"):
            async with s.post(srv.url + "/v1/jobs", data=form(jfk, formats="txt", idempotency_key=key)) as r:
                keyed.add((await r.json())["id"])
        assert len(keyed) == 2 and first not in keyed  # the keys decide: two jobs, never the unkeyed one
        assert len(srv.stored()) == 4  # one stored media per job, none for a joined request


async def test_redis_connections_are_bounded(redis_url, tmp_path, data_dir):
    """Streams beyond ``max_streams`` get 503 at once; the others keep their connections."""
    async with serve(redis_url, tmp_path, max_streams=2, redis_connections=4, stream_poll_s=0.3) as srv, aiohttp.ClientSession() as s:
        async with s.post(srv.url + "/v1/jobs", data=form(data_dir / "jfk.flac", formats="txt")) as r:
            job_id = (await r.json())["id"]
        opened = [await s.get(f"{srv.url}/v1/jobs/{job_id}/events") for _ in range(2)]
        try:
            assert [r.status for r in opened] == [200, 200]
            async with s.get(f"{srv.url}/v1/jobs/{job_id}/events") as r:
                assert r.status == 503 and r.headers["Retry-After"] == "5"
                assert "progress streams" in (await r.json())["error"]["message"]
            async with s.get(f"{srv.url}/v1/jobs/{job_id}") as r:  # ordinary requests still served
                assert r.status == 200
        finally:
            for r in opened:
                r.close()


# -- item 11: no orphaned uploads ----------------------------------------------------------------


async def test_media_is_deleted_when_redis_dies_before_the_record(redis_server_factory, tmp_path, data_dir):
    """Redis is killed -9 right after the media is stored and before its job record is written:
    the client gets 503 and the stored media is gone, not left where no sweep would find it."""
    server = redis_server_factory()
    async with serve(server.url, tmp_path) as srv, aiohttp.ClientSession() as s:
        storage = srv.state.storage
        put_file = storage.put_file
        stored: list[str] = []

        async def put_then_kill(key, path):
            await put_file(key, path)
            stored.append(key)
            assert srv.stored(), "put_file stored nothing"
            server.kill()  # Redis dies at the worst moment

        storage.put_file = put_then_kill
        async with s.post(srv.url + "/v1/jobs", data=form(data_dir / "jfk.flac", formats="txt")) as r:
            assert r.status == 503, await r.text()
            assert "Redis" in (await r.json())["error"]["message"]
        assert stored, "the media was never stored: the test did not reach the moment it is about"
        assert srv.stored() == [], srv.stored()
        # Redis back: the same upload makes a job, whose media is kept
        server.start()
        storage.put_file = put_file
        async with s.post(srv.url + "/v1/jobs", data=form(data_dir / "jfk.flac", formats="txt")) as r:
            assert r.status == 202, await r.text()
        assert len(srv.stored()) == 1


# -- item 13: metrics from counters, for all owners together; languages -----------------------------


async def test_metrics_come_from_counters_not_a_scan_of_records(redis_url, tmp_path, data_dir):
    import redis.asyncio as aioredis

    from app.jobs import JobStore

    token_b = "token-i-" + "r" * 24
    async with serve(redis_url, tmp_path, tokens=f"{TOKEN},{token_b}") as srv, aiohttp.ClientSession() as s:
        a, b = {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": f"Bearer {token_b}"}
        ids = []
        for fmt in ("txt", "srt", "vtt"):
            async with s.post(srv.url + "/v1/jobs", data=form(data_dir / "jfk.flac", formats=fmt), headers=a) as r:
                ids.append((await r.json())["id"])
        # one job runs to the end the way the workers move it
        store = JobStore(aioredis.Redis.from_url(redis_url))
        for to in ("extracting", "segmenting", "transcribing", "merging", "rendering"):
            await store.transition(ids[0], to)
        await store.transition(ids[0], "done", duration=11.0)
        await store.fail(ids[1], "broken")
        await store.transition(ids[2], "extracting")
        admin = aioredis.Redis.from_url(redis_url)
        await admin.config_resetstat()
        async with s.get(srv.url + "/metrics", headers=b) as r:  # another owner sees totals only
            assert r.status == 200
            text = await r.text()
        cmds = await admin.info("commandstats")
        await admin.aclose()
        await store.aclose()
    assert 'vtp_jobs{state="queued"} 0' in text and 'vtp_jobs{state="extracting"} 1' in text
    assert 'vtp_jobs_ended_total{state="done"} 1' in text and 'vtp_jobs_ended_total{state="failed"} 1' in text
    assert "vtp_audio_seconds_processed_total 11.000" in text
    assert 'vtp_stage_seconds_count{stage="extract"} 1' in text
    for job_id in ids:
        assert job_id not in text
    assert "owner=" not in text and "tok_" not in text
    # the scrape read counters: no job record was fetched, and no index of them walked
    read = {name.removeprefix("cmdstat_") for name in cmds}
    assert "mget" not in read and "zrevrange" not in read and "get" not in read, read


async def test_unknown_language_refused_at_submit_on_every_entry_point(redis_url, tmp_path, data_dir):
    import openai

    async with serve(redis_url, tmp_path) as srv, aiohttp.ClientSession() as s:
        for code in ("en-US", "xx", "english"):
            async with s.post(srv.url + "/v1/jobs", data=form(data_dir / "jfk.flac", language=code)) as r:
                body = await r.json()
                assert r.status == 400 and "language" in body["error"]["message"], (code, body)
            async with s.post(srv.url + "/v1/jobs", json={"url": "http://example.com/a.mp4", "language": code}) as r:
                assert r.status == 400, code
        async with s.post(srv.url + "/v1/jobs", data=form(data_dir / "jfk.flac", language="en-US")) as r:
            assert "use 'en' (English)" in (await r.json())["error"]["message"]
        for code in ("en", "DE", "yue", "haw"):  # Whisper's codes, any case
            async with s.post(srv.url + "/v1/jobs", data=form(data_dir / "jfk.flac", language=code, formats="txt")) as r:
                assert r.status in (200, 202), (code, await r.text())
        client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=10)
        with (data_dir / "jfk.flac").open("rb") as f, pytest.raises(openai.BadRequestError, match="not one Whisper knows"):
            await client.audio.transcriptions.create(model="whisper-1", file=f, language="en-US")
        await client.close()
    # the CLI: a usage error before anything is uploaded or queued
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("VTP_", "REDIS_"))}, "REDIS_URL": redis_url}
    res = subprocess.run(
        [sys.executable, "-m", "app.cli", "submit", str(data_dir / "jfk.flac"), "--language", "en-US"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 2 and "not one Whisper knows" in res.stderr, res.stderr


def test_language_list_is_whispers():
    """app.languages (which the web process may import) holds exactly faster-whisper's codes."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    from app.languages import LANGUAGES

    assert set(LANGUAGES) == set(_LANGUAGE_CODES)
    assert all(name and name[0].isupper() for name in LANGUAGES.values())
