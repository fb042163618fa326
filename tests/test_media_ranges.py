"""HTTP Range serving of job media (``app.web.media.serve``) over both storages: a local directory
and S3 (moto's real HTTP server, as in test_storage.py), through a real aiohttp server."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.web import media
from test_storage import s3_endpoint, storage  # noqa: F401  (fixtures: local and s3)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

DATA = bytes(range(256)) * 4000  # 1 024 000 bytes: more than one streaming CHUNK, every offset distinguishable


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def served(storage):  # noqa: F811
    await storage.put_bytes("jobs/x/media", DATA)
    await storage.put_bytes("jobs/x/audio.pcm", DATA[:32000])

    async def upload(request):
        size = await storage.size("jobs/x/media")
        source = media.Source(size, lambda s, n: storage.get_range("jobs/x/media", s, n), "video/mp4", '"v1"')
        return await media.serve(request, source)

    app = web.Application()
    app.router.add_get("/media", upload)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}/media"
    finally:
        await server.close()


async def get(url, **headers):
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, r.headers, await r.read()


async def test_one_range_is_206_with_its_bytes(served):
    status, headers, body = await get(served, Range="bytes=100-199")
    assert (status, headers["Content-Range"], body) == (206, f"bytes 100-199/{len(DATA)}", DATA[100:200])
    assert headers["Accept-Ranges"] == "bytes" and headers["Content-Type"] == "video/mp4"
    status, headers, body = await get(served, Range=f"bytes={len(DATA) - 5}-")
    assert (status, body) == (206, DATA[-5:])
    status, headers, body = await get(served, Range="bytes=-7")
    assert (status, headers["Content-Range"], body) == (206, f"bytes {len(DATA) - 7}-{len(DATA) - 1}/{len(DATA)}", DATA[-7:])
    status, _h, body = await get(served, Range="bytes=1000-9999999")  # clipped to the end
    assert (status, body) == (206, DATA[1000:])


async def test_no_range_several_or_malformed_ranges_send_the_whole_object(served):
    for header in (None, "bytes=0-1,5-6", "items=0-3", "bytes=9-2"):
        status, headers, body = await get(served, **({"Range": header} if header else {}))
        assert (status, int(headers["Content-Length"]), body == DATA) == (200, len(DATA), True), header


async def test_range_past_the_end_is_416(served):
    status, headers, _ = await get(served, Range=f"bytes={len(DATA)}-")
    assert (status, headers["Content-Range"]) == (416, f"bytes */{len(DATA)}")


async def test_if_range_of_another_version_sends_the_whole_object(served):
    status, _h, body = await get(served, Range="bytes=0-9", **{"If-Range": '"v0"'})
    assert (status, len(body)) == (200, len(DATA))
    status, _h, body = await get(served, Range="bytes=0-9", **{"If-Range": '"v1"'})
    assert (status, body) == (206, DATA[:10])


def test_wav_header_describes_the_pcm():
    import io
    import wave

    pcm = bytes(range(200)) * 16  # 3200 bytes: 1600 samples
    with wave.open(io.BytesIO(media.wav_header(len(pcm)) + pcm)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 16000, 1600)
        assert w.readframes(1600) == pcm


async def test_head_answers_the_length_without_a_body(served):
    async with aiohttp.ClientSession() as s, s.head(served, headers={"Range": "bytes=10-19"}) as r:
        assert (r.status, r.headers["Content-Length"], await r.read()) == (206, "10", b"")
