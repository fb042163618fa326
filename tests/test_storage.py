"""Storage backends: the same contract on a local directory and on S3 (moto's real HTTP server
on a loopback port, as in test_dag.py), including the ranged reads the segment stage streams by."""

from __future__ import annotations

import pytest

from app import errors
from app.storage import LocalStorage, S3Storage
from tests.support.dag_cluster import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

DATA = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    import boto3

    endpoint = request.getfixturevalue("s3_endpoint")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = f"vtp-{tmp_path.name.lower().replace('_', '-')}"[:63]
    client.create_bucket(Bucket=bucket)
    return S3Storage(bucket, "pre/fix", client=client)


async def test_size_and_ranges(storage):
    await storage.put_bytes("jobs/a/audio.pcm", DATA)
    assert await storage.size("jobs/a/audio.pcm") == len(DATA)
    assert await storage.get_range("jobs/a/audio.pcm", 0, 16) == DATA[:16]
    assert await storage.get_range("jobs/a/audio.pcm", 1000, 3000) == DATA[1000:4000]
    # the tail is shorter than asked for; past the end there is nothing; zero bytes is zero bytes
    assert await storage.get_range("jobs/a/audio.pcm", len(DATA) - 10, 100) == DATA[-10:]
    assert await storage.get_range("jobs/a/audio.pcm", len(DATA), 100) == b""
    assert await storage.get_range("jobs/a/audio.pcm", len(DATA) + 5000, 100) == b""
    assert await storage.get_range("jobs/a/audio.pcm", 7, 0) == b""
    # reading the whole object in ranges gives the object back
    blocks = [await storage.get_range("jobs/a/audio.pcm", o, 4096) for o in range(0, len(DATA), 4096)]
    assert b"".join(blocks) == DATA


async def test_empty_object(storage):
    await storage.put_bytes("jobs/e/empty", b"")
    assert await storage.size("jobs/e/empty") == 0
    assert await storage.get_range("jobs/e/empty", 0, 10) == b""


async def test_missing_objects_and_bad_ranges_are_storage_errors(storage):
    with pytest.raises(errors.StorageError, match="missing artifact"):
        await storage.size("jobs/nope/audio.pcm")
    with pytest.raises(errors.StorageError, match="missing artifact"):
        await storage.get_range("jobs/nope/audio.pcm", 0, 10)
    await storage.put_bytes("jobs/b/x", DATA)
    with pytest.raises(errors.StorageError, match="invalid byte range"):
        await storage.get_range("jobs/b/x", -1, 10)
    with pytest.raises(errors.StorageError, match="invalid byte range"):
        await storage.get_range("jobs/b/x", 0, -1)
    with pytest.raises(errors.StorageError, match="invalid storage key"):
        await storage.get_range("../etc/passwd", 0, 10)
