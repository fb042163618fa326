"""Every language: the multilingual Whisper base (``vtp[multilingual]``, real weights), each job
decoded in its own language whatever shares the GPU worker's model calls, and translation to
English through the CLI, the jobs API and the ``openai`` client.

Spanish speech is ``tests/data/es_lecture.opus`` (espeak-ng); English is ``jfk.flac``. One
cluster (CPU worker, GPU worker serving base and tiny.en) and one web process serve the API
tests; the shared-worker test starts its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings

import aiohttp
import anyio
import numpy as np
import pytest
import redis as redis_sync
from faster_whisper import decode_audio

from app import constants
from app.jobs import JobStore
from app.messages import Chunk, TranscribeOptions
from app.storage import LocalStorage
from tests.support.dag_cluster import free_port
from tests.support.redis_server import RedisServer
from tests.support.dag_cluster import ROOT, Cluster
from test_web import WebProcess, auth, flat, form, wait_done
from tests.support.wer import wer, wer_any
from workers.batcher import GpuBatcher
from workers.engines.models import registry_model_path

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

TOKEN = "token-languages-" + "z" * 24
SPANISH = "es_lecture.opus"
#: What the translation of the Spanish lecture must say (base's own English, checked by ear).
ENGLISH_WORDS = ("today", "talk about", "conservation of energy", "transformed")


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    server = RedisServer(free_port(), tmp_path_factory.mktemp("lang-redis"), appendonly=False)
    server.start()
    env = {
        "VTP_API_TOKENS": TOKEN,
        "VTP_MODELS": "base,tiny.en",
    }
    c = Cluster(server.url, tmp_path_factory.mktemp("lang"), env=env)
    try:
        c.start_worker("cpu", "cpu-1", concurrency=4)
        c.start_worker("gpu", "gpu-1")
        c.wait_ready(("cpu-1", "cpu"), ("gpu-1", "gpu"), timeout=120)
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


def reference(data_dir, name: str) -> str:
    return (data_dir / name).read_text()


def gpu_stats(redis_url: str) -> dict[str, str]:
    probe = redis_sync.Redis.from_url(redis_url)
    try:
        return {k.decode(): v.decode() for k, v in probe.hgetall(constants.gpu_stats_key("gpu-1")).items()}
    finally:
        probe.close()


async def test_spanish_and_english_jobs_sharing_a_gpu_worker_each_keep_their_own_language(make_cluster, redis_url, data_dir):
    """Both jobs' transcribe stages wait in the GPU queue before the worker starts, so it takes
    them together (VTP_GPU_JOBS=2) and their chunks meet in its batcher (decode batches of two):
    on main they shared one model call, decoded in one language."""
    c = make_cluster(redis_url, VTP_MODELS="base", VTP_GPU_JOBS="2", VTP_DECODE_BATCH="2", VTP_BATCH_WAIT_MS="3000",
                     VTP_BATCH_SIZE="8")
    c.start_worker("cpu", "cpu-1", concurrency=4)
    c.wait_ready(("cpu-1", "cpu"))
    ids = dict(zip((SPANISH, "jfk.flac"), c.submit(data_dir / SPANISH, data_dir / "jfk.flac", extra=("--no-reuse",))))
    store = JobStore.open(redis_url)
    try:
        with anyio.fail_after(60):
            while await store.redis.zcard(constants.QUEUE_GPU) < 2:
                await anyio.sleep(0.05)
        c.start_worker("gpu", "gpu-1")
        with anyio.fail_after(150):
            records = {name: await store.wait(job_id) for name, job_id in ids.items()}
    finally:
        await store.aclose()
    assert [r.state for r in records.values()] == ["done", "done"], [r.error for r in records.values()] + [c.logs()]
    storage = LocalStorage(c.data_dir)
    docs = {name: json.loads(await storage.get_bytes(r.outputs["json"])) for name, r in records.items()}
    assert records[SPANISH].language == docs[SPANISH]["language"] == "es"
    assert records["jfk.flac"].language == docs["jfk.flac"]["language"] == "en"
    assert docs[SPANISH]["task"] == "transcribe"
    assert wer_any(reference(data_dir, "es_lecture.ref.txt"), docs[SPANISH]["text"]) < 0.2, docs[SPANISH]["text"]
    assert wer(reference(data_dir, "jfk.ref.txt"), docs["jfk.flac"]["text"]) < 0.2, docs["jfk.flac"]["text"]
    await anyio.sleep(5.5)  # the next health refresh publishes the batcher's counters
    stats = gpu_stats(redis_url)
    # both jobs waited in the batcher together, and the model calls kept them apart
    assert int(stats["kept_apart"]) >= 1, stats
    assert int(stats["shared_batches"]) == 0, stats


def test_a_batcher_never_decodes_a_request_in_its_neighbours_language(data_dir):
    """In process, the batcher itself: requests that name no language are split by each chunk's
    detected language before they are queued, and groups never mix languages."""
    from workers.engines.ctranslate2 import FasterWhisperEngine

    engine = FasterWhisperEngine.load(TranscribeOptions(model="base"))
    batcher = GpuBatcher(engine, batch_size=2, max_wait_ms=2000)
    audio = {"es": decode_audio(str(data_dir / SPANISH)), "en": decode_audio(str(data_dir / "jfk.flac"))}
    results = {}

    def one(lang: str) -> None:
        a = audio[lang]
        results[lang] = batcher.transcribe_batch([a], [Chunk(index=0, start=0.0, end=a.size / 16000)], TranscribeOptions(model="base"))

    try:
        threads = [threading.Thread(target=one, args=(lang,)) for lang in audio]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        batcher.close()
    assert results["es"][1] == "es" and results["en"][1] == "en"
    assert wer_any(reference(data_dir, "es_lecture.ref.txt"), " ".join(s.text for s in results["es"][0])) < 0.2
    assert wer(reference(data_dir, "jfk.ref.txt"), " ".join(s.text for s in results["en"][0])) < 0.2
    assert batcher.stats.shared_batches == 0 and batcher.stats.kept_apart >= 1


def test_mixed_language_media_decoded_per_chunk(data_dir, tmp_path):
    """``--language-per-chunk``: Spanish, a pause, then English, each chunk in its own language."""
    from tests.support.media import RATE, load_pcm, write_wav

    parts = [load_pcm(data_dir / SPANISH), np.zeros(2 * RATE, np.float32), load_pcm(data_dir / "jfk.flac")]
    mixed = write_wav(np.concatenate(parts), tmp_path / "mixed.wav")
    out = tmp_path / "out"
    res = cli("transcribe", str(mixed), "--model", "base", "--language-per-chunk", "--formats", "json", "-q", "-o", str(out))
    assert res.returncode == 0, res.stderr
    text = flat(json.loads((out / "mixed.json").read_text())["text"])
    assert "conservación de la energía" in text and "what your country can do for you" in text, text


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_translation_through_the_cli(data_dir, tmp_path):
    res = cli("transcribe", str(data_dir / SPANISH), "--model", "base", "--task", "translate",
              "--formats", "json,txt", "-q", "-o", str(tmp_path))
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "es_lecture.json").read_text())
    assert doc["language"] == "es" and doc["task"] == "translate"
    text = flat(doc["text"])
    assert all(w in text for w in ENGLISH_WORDS), text
    # refused before any work: an English-only model cannot translate; unknown language codes
    res = cli("transcribe", str(data_dir / SPANISH), "--task", "translate", "-o", str(tmp_path / "no"))
    assert res.returncode == 2 and "tiny.en' is English-only and cannot translate" in res.stderr
    res = cli("transcribe", str(data_dir / SPANISH), "--model", "base", "--language", "xx", "-o", str(tmp_path / "no"))
    assert res.returncode == 2 and "language 'xx' is not one Whisper knows" in res.stderr


async def test_translation_through_the_jobs_api_and_the_openai_client(web_server, data_dir):
    import openai

    async with aiohttp.ClientSession() as s:
        data = form(data_dir / SPANISH, task="translate", formats="json")
        async with s.post(f"{web_server.url}/v1/jobs", data=data, headers=auth(TOKEN)) as r:
            assert r.status == 202, await r.text()
            job = await r.json()
        assert job["task"] == "translate" and job["model"] == "base"
        job = await wait_done(s, web_server.url, job["id"], TOKEN, timeout=120)
        assert job["status"] == "done" and job["language"] == "es", job
        async with s.get(f"{web_server.url}/v1/jobs/{job['id']}/transcript.json", headers=auth(TOKEN)) as r:
            doc = json.loads(await r.read())
        assert doc["task"] == "translate" and doc["language"] == "es"
        assert all(w in flat(doc["text"]) for w in ENGLISH_WORDS), doc["text"]

    client = openai.AsyncOpenAI(base_url=f"{web_server.url}/v1", api_key=TOKEN, max_retries=0, timeout=120)

    async def translate(**kw):
        # openai 2.x/3.x marks audio.translations deprecated (OpenAI's own endpoint only serves
        # whisper-1) but sends the same request: the warning is the client's, not ours.
        with warnings.catch_warnings(), (data_dir / SPANISH).open("rb") as f:
            warnings.filterwarnings("ignore", "deprecated", DeprecationWarning)
            return await client.audio.translations.create(file=f, **kw)

    try:
        result = await translate(model="whisper-1")
        assert all(w in flat(result.text) for w in ENGLISH_WORDS), result.text
        verbose = await translate(model="base", response_format="verbose_json")
        assert verbose.language == "es" and verbose.task == "translate" and verbose.segments
        with pytest.raises(openai.BadRequestError, match="English-only and cannot translate"):
            await translate(model="tiny.en")
    finally:
        await client.close()


async def test_unknown_language_and_translate_on_an_english_only_model_are_400(web_server, data_dir):
    async with aiohttp.ClientSession() as s:
        cases = [
            ({"language": "xx"}, "language 'xx' is not one Whisper knows"),
            ({"language": "klingon"}, "invalid option"),
            ({"task": "translate", "model": "tiny.en"}, "English-only and cannot translate"),
            ({"task": "summarise"}, "invalid option"),
        ]
        for fields, message in cases:
            async with s.post(f"{web_server.url}/v1/jobs", data=form(data_dir / "jfk.flac", **fields), headers=auth(TOKEN)) as r:
                body = await r.json()
                assert r.status == 400 and message in body["error"]["message"], (fields, body)
        async with s.post(f"{web_server.url}/v1/jobs", json={"url": "https://example.com/a.mp4", "language": "zz"},
                          headers=auth(TOKEN)) as r:
            assert r.status == 400 and "language 'zz' is not one Whisper knows" in (await r.json())["error"]["message"]


def test_the_multilingual_model_is_assembled_from_its_wheels_and_checked(tmp_path):
    from app import errors
    from workers.engines import models

    path = registry_model_path("base")
    assert (path / "model.bin").stat().st_size == 145217532 and (path / "tokenizer.json").exists()
    # a part whose bytes are not the pinned ones is refused, and nothing is written
    bad = models.SplitModel(name="bad", packages=models.WHISPER_BASE.packages, extra="x", part_sha256=("0" * 64, "1" * 64))
    with pytest.raises(errors.ModelNotFound, match="is not the pinned"):
        models.split_model_path(bad, tmp_path)
    assert not (tmp_path / "models").exists()


def test_the_transformers_engine_detects_and_translates_with_base(data_dir, tmp_path):
    """The transformers engine converts base like tiny.en and honours language and task."""
    from workers.engines.transformers import TransformersEngine

    engine = TransformersEngine.load(TranscribeOptions(engine="transformers", model="base"), cache_dir=tmp_path)
    assert engine.multilingual
    es, en = decode_audio(str(data_dir / SPANISH)), decode_audio(str(data_dir / "jfk.flac"))
    assert [lang for lang, _p in engine.detect_languages([es, en])] == ["es", "en"]
    chunk = Chunk(index=0, start=0.0, end=es.size / 16000)
    options = TranscribeOptions(engine="transformers", model="base", language="es", task="translate", beam_size=1)
    segments, language = engine.transcribe_batch([es], [chunk], options)
    assert language == "es"
    text = flat(" ".join(s.text for s in segments))
    assert "conservation of energy" in text and "transformed" in text, text


def test_the_form_offers_detect_and_every_language_by_name_and_both_tasks():
    import re

    from app.languages import LANGUAGES

    html = (ROOT / "app" / "web" / "static" / "index.html").read_text()
    select = html.split('<select id="language"', 1)[1].split("</select>", 1)[0]
    options = dict(re.findall(r'<option value="([^"]*)"[^>]*>([^<]*)</option>', select))
    assert options == {"": "Detect", **LANGUAGES}
    task = html.split('<select id="task"', 1)[1].split("</select>", 1)[0]
    assert re.findall(r'<option value="([^"]*)"', task) == ["transcribe", "translate"]
