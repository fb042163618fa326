"""``GET /metrics``: Prometheus text format, computed from Redis at scrape time.

* ``vtp_queue_depth{queue}``: arq jobs waiting in each queue (``vtp:cpu``, ``vtp:gpu``);
* ``vtp_jobs{state}``: jobs by state, among the newest ``SCAN_JOBS`` records still kept
  (``VTP_RESULT_TTL``), so it is a gauge over the retained window, not a lifetime counter;
* ``vtp_audio_seconds_processed``: media seconds of the ``done`` jobs in that window;
* ``vtp_stage_seconds_sum`` / ``_count{stage}``: time in each stage (queue, extract, segment,
  transcribe, merge, render) of those done jobs: average stage latency is sum / count;
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
