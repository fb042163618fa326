"""``GET /metrics``: Prometheus text format, from counters kept in Redis.

Every number is the whole server's, never one owner's: any token may read them (no job, name
or owner appears). A scrape costs a few Redis commands however many jobs there are: the job
counts are counters ``app.jobs.JobStore`` moves in the same MULTI as each state change
(``vtp:stats``), not a scan of the records.

* ``vtp_queue_depth{queue}``: arq jobs waiting in each queue (``vtp:cpu``, ``vtp:gpu``);
* ``vtp_jobs{state}``: jobs queued or in each running state now;
* ``vtp_jobs_ended_total{state}``: jobs that ended done, failed or cancelled;
* ``vtp_audio_seconds_processed_total``: media seconds of the jobs that ended done;
* ``vtp_stage_seconds_sum`` / ``_count{stage}``: time in each stage (queue, extract, segment,
  transcribe, merge, render) of the jobs that ended done: average stage latency is sum / count;
* ``vtp_gpu_decode_batches_total`` / ``_chunks_total`` / ``_slots_total{worker}``, and the gauges
  ``vtp_gpu_batch_fill_ratio``, ``vtp_gpu_decode_batch_size`` (the configured size) and
  ``vtp_gpu_last_batch{worker}``: each live GPU worker's batching across jobs, from its
  ``vtp:gpustats:<name>`` hash (``workers/batcher.py``; counters since that worker started);
* ``vtp_http_requests_total{method,route,status}``, ``vtp_upload_bytes_total``,
  ``vtp_web_open_streams`` and ``vtp_web_openai_waiting``: this web process's own, since it
  started.

The counters count from when this version first ran against the Redis database; a record
that vanished without ending (a flushed or evicting Redis) leaves its state's gauge one high.

No client library: the format is a few lines of text, and the numbers live in Redis anyway.
"""

from __future__ import annotations

from aiohttp import web

from app import constants, dag
from app.redis_outage import retrying
from app.web.state import state

ACTIVE_STATES = dag.ACTIVE_STATES
ENDED_STATES = dag.ENDED_STATES


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
        await _gpu_stats(redis, lines)

    await retrying(read, where=st.store.where, outage_s=st.store.outage_s)
    stats = await st.store.stats()
    lines.append("# HELP vtp_jobs jobs in each state before the end, now (all owners together)")
    lines.append("# TYPE vtp_jobs gauge")
    for name in ACTIVE_STATES:
        lines.append(f'vtp_jobs{{state="{name}"}} {max(stats.get("state:" + name, 0.0), 0.0):g}')
    lines.append("# HELP vtp_jobs_ended_total jobs that ended done, failed or cancelled (all owners together)")
    lines.append("# TYPE vtp_jobs_ended_total counter")
    for name in ENDED_STATES:
        lines.append(f'vtp_jobs_ended_total{{state="{name}"}} {stats.get("state:" + name, 0.0):g}')
    lines.append("# HELP vtp_audio_seconds_processed_total media seconds of the jobs that ended done")
    lines.append("# TYPE vtp_audio_seconds_processed_total counter")
    lines.append(f"vtp_audio_seconds_processed_total {stats.get('audio_seconds', 0.0):.3f}")
    lines.append("# HELP vtp_stage_seconds time the jobs that ended done spent in each stage")
    lines.append("# TYPE vtp_stage_seconds summary")
    for stage in sorted(k.split(":", 1)[1] for k in stats if k.startswith("stage_seconds:")):
        lines.append(f'vtp_stage_seconds_sum{{stage="{_label(stage)}"}} {stats["stage_seconds:" + stage]:.3f}')
        lines.append(f'vtp_stage_seconds_count{{stage="{_label(stage)}"}} {stats.get("stage_count:" + stage, 0.0):g}')

    lines.append("# HELP vtp_http_requests_total requests this web process answered")
    lines.append("# TYPE vtp_http_requests_total counter")
    for (method, route, status), n in sorted(st.requests.items()):
        lines.append(f'vtp_http_requests_total{{method="{method}",route="{_label(route)}",status="{status}"}} {n}')
    lines.append("# HELP vtp_upload_bytes_total bytes of media this web process received")
    lines.append("# TYPE vtp_upload_bytes_total counter")
    lines.append(f"vtp_upload_bytes_total {st.upload_bytes}")
    lines.append("# HELP vtp_web_open_streams progress streams this web process serves now")
    lines.append("# TYPE vtp_web_open_streams gauge")
    lines.append(f"vtp_web_open_streams {st.streams}")
    lines.append("# HELP vtp_web_openai_waiting OpenAI-compatible requests of this web process waiting for their job now")
    lines.append("# TYPE vtp_web_openai_waiting gauge")
    lines.append(f"vtp_web_openai_waiting {st.openai_waiting}")
    body = ("\n".join(lines) + "\n").encode()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
