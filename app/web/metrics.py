"""``GET /metrics``: Prometheus text format, computed from Redis at scrape time.

* ``vtp_queue_depth{queue}``: arq jobs waiting in each queue (``vtp:cpu``, ``vtp:gpu``);
* ``vtp_jobs{state}``: jobs by state, among the newest ``SCAN_JOBS`` records still kept
  (``VTP_RESULT_TTL``), so it is a gauge over the retained window, not a lifetime counter;
* ``vtp_audio_seconds_processed``: media seconds of the ``done`` jobs in that window;
* ``vtp_stage_seconds_sum`` / ``_count{stage}``: time in each stage (queue, extract, segment,
  transcribe, merge, render) of those done jobs: average stage latency is sum / count;
* ``vtp_gpu_decode_batches_total`` / ``_chunks_total`` / ``_slots_total{worker}``, and the gauges
  ``vtp_gpu_batch_fill_ratio``, ``vtp_gpu_decode_batch_size`` (the configured size) and
  ``vtp_gpu_last_batch{worker}``: each live GPU worker's batching across jobs, from its
  ``vtp:gpustats:<name>`` hash (``workers/batcher.py``; counters since that worker started);
* ``vtp_http_requests_total{method,route,status}`` and ``vtp_upload_bytes_total``: this web
  process's own counters since it started.

No client library: the format is a few lines of text, and the numbers live in Redis anyway.
"""

from __future__ import annotations

from aiohttp import web

from app import constants
from app.jobs import retrying
from app.messages import JobRecord, decode
from app.web.server import state

SCAN_JOBS = 5000
_BATCH = 500


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_GPU_METRICS = (
    # (metric, hash field, type, help)
    ("vtp_gpu_decode_batches_total", "batches", "counter", "model calls of each GPU worker's batcher"),
    ("vtp_gpu_decode_chunks_total", "chunks", "counter", "chunks decoded by each GPU worker"),
    ("vtp_gpu_decode_slots_total", "slots", "counter", "chunks full batches would have held (fill = chunks / slots)"),
    ("vtp_gpu_shared_batches_total", "shared_batches", "counter", "decode batches that held chunks of several jobs"),
    ("vtp_gpu_kept_apart_total", "kept_apart", "counter", "decode batches made while chunks to decode another way (language, task, beam) waited"),
    ("vtp_gpu_batch_fill_ratio", "fill_ratio", "gauge", "chunks per decode batch / decode batch size, since start"),
    ("vtp_gpu_decode_batch_size", "decode_batch", "gauge", "the GPU worker's decode batch size (VTP_DECODE_BATCH)"),
    ("vtp_gpu_last_batch", "last_batch", "gauge", "chunks in the GPU worker's latest decode batch"),
)


async def _gpu_stats(redis, lines: list[str]) -> None:
    keys = sorted([k async for k in redis.scan_iter(match=constants.GPU_STATS_PREFIX + "*", count=100)])
    workers = []
    for key in keys:
        stats = {k.decode(): v.decode() for k, v in (await redis.hgetall(key)).items()}
        if stats:
            workers.append((key.decode()[len(constants.GPU_STATS_PREFIX) :], stats))
    for metric, field, kind, text in _GPU_METRICS:
        lines.append(f"# HELP {metric} {text}")
        lines.append(f"# TYPE {metric} {kind}")
        for name, stats in workers:
            try:
                value = float(stats.get(field, "0"))
            except ValueError:
                continue
            lines.append(f'{metric}{{worker="{_label(name)}"}} {value:g}')


async def handle(request: web.Request) -> web.Response:
    st = state(request)
    redis = st.store.redis
    lines: list[str] = []

    async def read() -> None:
        lines.clear()  # a retry after an outage starts over
        depths = {name: await redis.zcard(queue) for name, queue in constants.QUEUES.items()}
        lines.append("# HELP vtp_queue_depth arq jobs waiting in each queue")
        lines.append("# TYPE vtp_queue_depth gauge")
        lines.extend(f'vtp_queue_depth{{queue="{name}"}} {n}' for name, n in depths.items())
        ids = await redis.zrevrange(constants.JOBS_INDEX, 0, SCAN_JOBS - 1)
        states: dict[str, int] = {}
        audio = 0.0
        stage_sum: dict[str, float] = {}
        stage_count: dict[str, int] = {}
        for i in range(0, len(ids), _BATCH):
            keys = [constants.job_key(j.decode()) for j in ids[i : i + _BATCH]]
            for raw in await redis.mget(keys):
                if raw is None:
                    continue
                rec = decode(raw, JobRecord)
                states[rec.state] = states.get(rec.state, 0) + 1
                if rec.state == "done":
                    audio += rec.duration
                    for stage, seconds in rec.timings.items():
                        stage_sum[stage] = stage_sum.get(stage, 0.0) + seconds
                        stage_count[stage] = stage_count.get(stage, 0) + 1
        lines.append("# HELP vtp_jobs jobs by state among the retained job records")
        lines.append("# TYPE vtp_jobs gauge")
        for name in ("queued", "extracting", "segmenting", "transcribing", "merging", "rendering", "done", "failed", "cancelled"):
            lines.append(f'vtp_jobs{{state="{name}"}} {states.get(name, 0)}')
        lines.append("# HELP vtp_audio_seconds_processed media seconds of the retained done jobs")
        lines.append("# TYPE vtp_audio_seconds_processed gauge")
        lines.append(f"vtp_audio_seconds_processed {audio:.3f}")
        lines.append("# HELP vtp_stage_seconds time done jobs spent in each stage")
        lines.append("# TYPE vtp_stage_seconds summary")
        for stage in sorted(stage_sum):
            lines.append(f'vtp_stage_seconds_sum{{stage="{_label(stage)}"}} {stage_sum[stage]:.3f}')
            lines.append(f'vtp_stage_seconds_count{{stage="{_label(stage)}"}} {stage_count[stage]}')

        await _gpu_stats(redis, lines)

    await retrying(read, where=st.store.where, outage_s=st.store.outage_s)
    lines.append("# HELP vtp_http_requests_total requests this web process answered")
    lines.append("# TYPE vtp_http_requests_total counter")
    for (method, route, status), n in sorted(st.requests.items()):
        lines.append(f'vtp_http_requests_total{{method="{method}",route="{_label(route)}",status="{status}"}} {n}')
    lines.append("# HELP vtp_upload_bytes_total bytes of media this web process received")
    lines.append("# TYPE vtp_upload_bytes_total counter")
    lines.append(f"vtp_upload_bytes_total {st.upload_bytes}")
    body = ("\n".join(lines) + "\n").encode()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
