"""Artifact storage shared by machines that share no disk.

Stages never touch paths directly: they read and write *keys* (``jobs/<id>/audio.pcm``)
through a ``Storage``. ``LocalStorage`` keeps them under one directory (one host, or a
shared volume); ``S3Storage`` keeps them in any S3-compatible bucket (Tigris on Fly, AWS S3,
MinIO). ``open_storage(url)`` picks one from ``VTP_STORAGE``: ``file:///var/lib/vtp`` or
``s3://bucket/prefix``.

Both are synchronous underneath (filesystem, boto3); the async methods push the blocking
work to a thread so a worker's event loop keeps serving heartbeats.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

import anyio

from app import errors

_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")


def check_key(key: str) -> str:
    """Keys are relative, slash-separated names of safe characters: no '..', no absolute paths."""
    if not _KEY_RE.match(key) or ".." in key.split("/"):
        raise errors.StorageError(f"invalid storage key {key!r}")
    return key


def _check_range(start: int, length: int) -> None:
    if start < 0 or length < 0:
        raise errors.StorageError(f"invalid byte range: start {start}, length {length}")


class Storage(Protocol):
    url: str

    async def put_bytes(self, key: str, data: bytes) -> None: ...

    async def get_bytes(self, key: str) -> bytes: ...

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from offset ``start`` (fewer at the end of the object, none past it)."""
        ...

    async def size(self, key: str) -> int:
        """The object's length in bytes."""
        ...

    async def put_file(self, key: str, path: Path) -> None: ...

    async def exists(self, key: str) -> bool: ...

    async def delete_prefix(self, prefix: str) -> None: ...

    def local_path(self, key: str) -> contextlib.AbstractAsyncContextManager[Path]:
        """A readable local file holding the object (downloaded first where needed)."""
        ...

    def new_local_file(self, key: str, suffix: str = "") -> contextlib.AbstractAsyncContextManager[Path]:
        """A path to write; stored under ``key`` when the block exits without error."""
        ...


def _temp_name(dest: Path, suffix: str = "") -> Path:
    """A temporary name beside ``dest``, unique per write: two containers on one shared volume
    often have the same PID, and one process may write the same key twice at once."""
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp{suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _disk_errors(key: str):
    """A full disk (or any OS error writing an artifact) is a StorageError: transient, retried."""
    try:
        yield
    except OSError as exc:
        raise errors.StorageError(f"cannot write artifact {key!r}: {exc.strerror or exc}") from exc


class LocalStorage:
    """Objects are files under ``root``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def adopt(self, key: str, source: Path) -> None:
        """Make an existing local file available under ``key`` without copying it."""
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        dest.symlink_to(Path(source).resolve())

    def _write(self, key: str, data: bytes) -> None:
        dest = self.path(key)
        with _disk_errors(key):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temp_name(dest)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())  # on disk before it is visible under its name
                os.replace(tmp, dest)  # readers never see half an object
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    async def put_bytes(self, key: str, data: bytes) -> None:
        await anyio.to_thread.run_sync(self._write, key, data)

    async def get_bytes(self, key: str) -> bytes:
        try:
            return await anyio.to_thread.run_sync(self.path(key).read_bytes)
        except FileNotFoundError as exc:
            raise errors.StorageError(f"missing artifact {key!r}") from exc

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        _check_range(start, length)
        path = self.path(key)

        def read() -> bytes:
            with path.open("rb") as f:
                f.seek(start)
                return f.read(length)

        try:
            return await anyio.to_thread.run_sync(read) if length else b""
        except FileNotFoundError as exc:
            raise errors.StorageError(f"missing artifact {key!r}") from exc

    async def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError as exc:
            raise errors.StorageError(f"missing artifact {key!r}") from exc

    async def put_file(self, key: str, path: Path) -> None:
        dest = self.path(key)

        def copy() -> None:
            with _disk_errors(key):
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = _temp_name(dest)
                try:
                    shutil.copyfile(path, tmp)
                    _fsync(tmp)
                    os.replace(tmp, dest)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()

        await anyio.to_thread.run_sync(copy)

    async def exists(self, key: str) -> bool:
        return self.path(key).exists()

    async def delete_prefix(self, prefix: str) -> None:
        target = self.path(prefix.rstrip("/"))
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(target, ignore_errors=True))

    @contextlib.asynccontextmanager
    async def local_path(self, key: str) -> AsyncIterator[Path]:
        path = self.path(key)
        if not path.exists():
            raise errors.StorageError(f"missing artifact {key!r}")
        yield path

    @contextlib.asynccontextmanager
    async def new_local_file(self, key: str, suffix: str = "") -> AsyncIterator[Path]:
        dest = self.path(key)
        with _disk_errors(key):
            dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(dest, suffix)
        try:
            yield tmp
            with _disk_errors(key):
                _fsync(tmp)
                os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


class S3Storage:
    """Objects in an S3-compatible bucket, under an optional prefix.

    Endpoint and credentials come from the usual AWS variables (``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...), which is also what Fly's Tigris sets.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client=None) -> None:
        import boto3  # imported here: local-only installs never pay for it

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self._client = client or boto3.client("s3", endpoint_url=endpoint)

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    async def _call(self, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise errors.StorageError(f"missing artifact in {self.url}: {exc}") from exc
            raise errors.StorageError(f"S3 error from {self.url}: {exc}") from exc
        except BotoCoreError as exc:
            raise errors.StorageError(f"S3 unreachable at {self.url}: {exc}") from exc

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self._call(self._client.put_object, Bucket=self.bucket, Key=self._name(key), Body=data)

    async def get_bytes(self, key: str) -> bytes:
        resp = await self._call(self._client.get_object, Bucket=self.bucket, Key=self._name(key))
        return await anyio.to_thread.run_sync(resp["Body"].read)

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        _check_range(start, length)
        if not length:
            return b""
        name = self._name(key)
        byte_range = f"bytes={start}-{start + length - 1}"

        def fetch() -> bytes:
            from botocore.exceptions import ClientError

            try:
                resp = self._client.get_object(Bucket=self.bucket, Key=name, Range=byte_range)
            except ClientError as exc:
                # S3 answers a range that starts past the end with 416 InvalidRange; like a read
                # past the end of a file, that is simply no bytes.
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""
                raise
            return resp["Body"].read()

        return await self._call(fetch)

    async def size(self, key: str) -> int:
        resp = await self._call(self._client.head_object, Bucket=self.bucket, Key=self._name(key))
        return int(resp["ContentLength"])

    async def put_file(self, key: str, path: Path) -> None:
        await self._call(self._client.upload_file, str(path), self.bucket, self._name(key))

    async def exists(self, key: str) -> bool:
        try:
            await self._call(self._client.head_object, Bucket=self.bucket, Key=self._name(key))
        except errors.StorageError:
            return False
        return True

    async def delete_prefix(self, prefix: str) -> None:
        name = self._name(prefix.rstrip("/")) + "/"

        def delete_all() -> None:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=name):
                objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objects:
                    self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})

        await self._call(delete_all)

    @contextlib.asynccontextmanager
    async def local_path(self, key: str) -> AsyncIterator[Path]:
        with tempfile.TemporaryDirectory(prefix="vtp-s3-") as tmp:
            path = Path(tmp) / Path(key).name
            await self._call(self._client.download_file, self.bucket, self._name(key), str(path))
            yield path

    @contextlib.asynccontextmanager
    async def new_local_file(self, key: str, suffix: str = "") -> AsyncIterator[Path]:
        with tempfile.TemporaryDirectory(prefix="vtp-s3-") as tmp:
            path = Path(tmp) / (Path(key).name + suffix)
            yield path
            await self.put_file(key, path)


async def download_outputs(storage: Storage, outputs: dict[str, str], output_dir: Path, basename: str) -> dict[str, Path]:
    """Copy rendered outputs (format -> key) to ``output_dir/basename.<format>``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for fmt, key in outputs.items():
        dest = output_dir / f"{basename}.{fmt}"
        dest.write_bytes(await storage.get_bytes(key))
        written[fmt] = dest
    return written


def open_storage(url: str) -> LocalStorage | S3Storage:
    """``file:///dir``, a plain directory path, or ``s3://bucket[/prefix]``."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise errors.OptionsError(f"VTP_STORAGE {url!r} names no bucket")
        return S3Storage(parsed.netloc, parsed.path)
    if parsed.scheme in ("", "file"):
        # file: URLs are percent-encoded (Path.as_uri writes a space as %20)
        return LocalStorage(unquote(parsed.path) if parsed.scheme else url)
    raise errors.OptionsError(f"unsupported storage URL {url!r}: use file:///dir or s3://bucket/prefix")
