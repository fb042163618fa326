"""Transient or permanent: what is retried and what fails a job at once, and the storage holes
that turn a crash into a lost or corrupt artifact (unique temporary names, paths with spaces)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest

from app import errors
from app.config import Settings
from app.messages import TranscribeOptions
from app.storage import LocalStorage, open_storage
from tests.support.dag_cluster import free_port
from workers import audio
from workers.engines.ctranslate2 import FasterWhisperEngine, load_error

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_disk_full_while_extracting_is_transient(data_dir):
    """/dev/full: every write fails with ENOSPC, as on a full disk."""
    with pytest.raises(errors.ResourceError, match="no space left on device") as caught:
        await audio.extract_pcm(data_dir / "jfk.flac", Path("/dev/full"), name="jfk.flac", timeout=60)
    assert not caught.value.permanent


@pytest.mark.anyio
async def test_corrupt_media_is_permanent(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_bytes(b"hello, not a video\n" * 50)
    with pytest.raises(errors.InputError) as caught:
        await audio.extract_pcm(bad, tmp_path / "out.pcm", name=bad.name, timeout=60)
    assert caught.value.permanent


def test_network_error_loading_a_model_is_transient(tmp_path):
    """A hub name with the hub unreachable (a closed local port): retried, not 'no such model'."""
    code = (
        "from app import errors\n"
        "from app.messages import TranscribeOptions\n"
        "from workers.engines.ctranslate2 import FasterWhisperEngine\n"
        "try:\n"
        "    FasterWhisperEngine.load(TranscribeOptions(model='Systran/faster-whisper-small.en'))\n"
        "except errors.VtpError as exc:\n"
        "    print(type(exc).__name__, exc.permanent)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["EngineError", "False"], res.stdout + res.stderr


def test_missing_model_directory_and_bad_options_are_permanent(tmp_path):
    with pytest.raises(errors.ModelNotFound) as missing:
        FasterWhisperEngine.load(TranscribeOptions(model=str(tmp_path / "no-such-model")))
    assert missing.value.permanent
    with pytest.raises(errors.OptionsError) as bad:
        FasterWhisperEngine.load(TranscribeOptions(compute_type="int3"))
    assert bad.value.permanent


def test_out_of_memory_loading_a_model_is_transient():
    """What CTranslate2 raises when CUDA runs out of memory (no GPU here to provoke it)."""
    err = load_error(RuntimeError("CUDA failed with error out of memory"), TranscribeOptions(device="cuda"), "/models/x")
    assert isinstance(err, errors.ResourceError) and not err.permanent
    corrupt = load_error(RuntimeError("Unable to open file 'model.bin'"), TranscribeOptions(), "/")
    assert isinstance(corrupt, errors.ModelNotFound) and corrupt.permanent


# -- storage -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_writes_of_one_key_never_collide(tmp_path):
    """Same process, same key, many writers at once (as two containers with one PID on a shared
    volume): every write completes whole, and no temporary file is left behind."""
    storage = LocalStorage(tmp_path)
    payloads = [bytes([i]) * 200_000 for i in range(16)]
    async with anyio.create_task_group() as tg:
        for data in payloads:
            tg.start_soon(storage.put_bytes, "jobs/j/out/t.json", data)
    assert await storage.get_bytes("jobs/j/out/t.json") in payloads
    assert [p.name for p in (tmp_path / "jobs" / "j" / "out").iterdir()] == ["t.json"]


def test_threads_writing_files_of_one_key(tmp_path):
    storage = LocalStorage(tmp_path / "s")
    sources = []
    for i in range(8):
        src = tmp_path / f"src{i}"
        src.write_bytes(bytes([i]) * 100_000)
        sources.append(src)
    failures = []

    def put(src):
        try:
            anyio.run(storage.put_file, "jobs/j/media", src)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            failures.append(exc)

    threads = [threading.Thread(target=put, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert (tmp_path / "s" / "jobs" / "j" / "media").read_bytes() in [s.read_bytes() for s in sources]
    assert [p.name for p in (tmp_path / "s" / "jobs" / "j").iterdir()] == ["media"]


@pytest.mark.anyio
async def test_a_data_dir_with_a_space_works(tmp_path):
    data = tmp_path / "my data dir"
    settings = Settings.from_env({"VTP_DATA_DIR": str(data)})
    storage = open_storage(settings.storage_url)
    assert storage.root == data.resolve()
    await storage.put_bytes("jobs/j/media", b"x")
    assert (data / "jobs" / "j" / "media").read_bytes() == b"x"
