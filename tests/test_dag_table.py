"""The DAG table (``app.dag``) is the one place the pipeline's shape is written: walk it, and
check that every consumer agrees with it — the job state machine, the worker's function lists,
the tasks, the sweeper's re-drive (on a real Redis), the local runner's order (a real run on
real speech), and the job page's list of ended states."""

from __future__ import annotations

import re
from typing import get_args

import pytest

from app import constants, dag, jobs
from app.config import Settings
from app.messages import (
    Chunk,
    ChunkBatch,
    ExtractedAudio,
    JobRecord,
    Segmentation,
    Stage,
    Transcript,
    TranscriptStats,
)
from tests.support.dag_cluster import ROOT

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_the_table_walks_from_the_first_stage_to_done_in_order():
    names = [s.name for s in dag.STAGES]
    assert len(set(names)) == len(names)
    for i, stage in enumerate(dag.STAGES):
        assert all(names.index(n) > i for n in stage.next), f"{stage.name} is followed by an earlier stage"
        assert stage.queue in constants.QUEUES and stage.deadline in ("cpu_timeout", "transcribe_timeout")
        assert set(stage.needs) <= set(dag.PARTS) | {"rendered"}
        assert stage.handoff_part in (None, *dag.PARTS)
    # every stage reaches the last one, and the last one ends the job
    reach = {dag.STAGES[-1].name}
    for stage in reversed(dag.STAGES[:-1]):
        assert any(n in reach for n in stage.next), f"{stage.name} never reaches {dag.STAGES[-1].name}"
        reach.add(stage.name)
    assert dag.STAGES[-1].state == dag.DONE and not dag.STAGES[-1].next
    assert dag.STATES[0] == dag.QUEUED and dag.STATES[-1] == dag.DONE
    assert set(dag.STATES) | set(dag.ENDED_STATES) == set(get_args(Stage))


def test_the_job_state_machine_is_the_tables():
    active = dag.ACTIVE_STATES
    for current in active:
        for to in dag.STATES:
            allowed = to == current or to in dag.NEXT_STATES[current]
            try:
                dag.check_transition("j", current, to)
            except Exception:  # noqa: BLE001 - JobError: refused
                assert not allowed, f"{current} -> {to} refused, the table allows it"
            else:
                assert allowed, f"{current} -> {to} allowed, the table has no such edge"
        for end in (dag.FAILED, dag.CANCELLED):
            dag.check_transition("j", current, end)
    # each stage's state moves on to the states of the stages that follow it
    for stage in dag.STAGES[:-1]:
        assert dag.NEXT_STATES[stage.state] == {dag.STAGE[n].state for n in stage.next}


def test_each_queue_registers_the_tables_stages_as_its_tasks():
    from workers.engines.pool import EnginePool
    from workers.runtime import tasks
    from workers.runtime.policy import BACKSTOP_S
    from workers.runtime.worker import worker_settings

    assert set(tasks.TASKS) == {s.function for s in dag.STAGES}
    settings = Settings.from_env({"VTP_CPU_TIMEOUT": "111", "VTP_TRANSCRIBE_TIMEOUT": "222"})
    for queue in constants.QUEUES:
        kw = worker_settings(queue, settings, engines=EnginePool())
        registered = {f.name: f for f in kw["functions"]}
        expected = [s.function for s in dag.ON_QUEUE[queue]] + ([constants.FN_WEBHOOK] if queue == "cpu" else [])
        assert list(registered) == expected
        assert kw["queue_name"] == constants.QUEUES[queue]
        for stage in dag.ON_QUEUE[queue]:
            assert registered[stage.function].coroutine is tasks.TASKS[stage.function]
            assert registered[stage.function].timeout_s == stage.timeout(settings) + BACKSTOP_S


def _record(job_id: str) -> JobRecord:
    return JobRecord(id=job_id, input_name="a.mp4", basename="a", media_key=f"jobs/{job_id}/media")


async def test_the_sweeper_redrives_the_stage_the_table_runs_in_each_state(redis_url):
    from workers.sweeper import Sweeper

    store = jobs.JobStore.open(redis_url)
    sweeper = Sweeper(store, None, None, Settings.from_env({"REDIS_URL": redis_url}))
    batches = [ChunkBatch(index=i, chunks=[Chunk(index=i, start=float(i), end=i + 1.0)], audio_key=f"b{i}") for i in range(2)]
    parts = {
        "audio": ExtractedAudio(audio_key="a.wav", duration=2.0),
        "segmentation": Segmentation(chunks=[c for b in batches for c in b.chunks], batches=batches, speech_seconds=2.0),
        "transcript": Transcript(
            language="en", duration=2.0, segments=[], stats=TranscriptStats(engine="noop", model="m", chunks=2, speech_seconds=2.0)
        ),
    }
    try:
        for i, state in enumerate(dag.ACTIVE_STATES):
            job_id = f"table{i}"
            record = _record(job_id)
            await store.create(record)
            path = dag.STATES[1 : dag.ORDER[state] + 1]
            for step in path:
                await store.transition(job_id, step)
            record = await store.get(job_id)
            stage = dag.RUNS_IN[state]
            for name in stage.needs:
                await store.put_part(job_id, name, parts[name])
            if stage.fan_out:
                await store.put_part(job_id, "segmentation", parts["segmentation"])
            steps = await sweeper.plan(record)
            if stage.fan_out:
                assert [s.arq_id for s in steps] == [stage.arq_id(job_id, b.index) for b in batches]
            else:
                assert [s.arq_id for s in steps] == [stage.arq_id(job_id)]
            assert steps == (
                [dag.job(stage.name, record, parts, b) for b in batches] if stage.fan_out else [dag.job(stage.name, record, parts)]
            )
            assert all(s.queue == stage.queue_name and s.function == stage.function for s in steps)
            # a stage whose output is in hands on to the next stage
            if stage.handoff_part and state == stage.state:
                await store.put_part(job_id, stage.handoff_part, parts[stage.handoff_part])
                nxt = dag.STAGE[stage.next[0]]
                assert [s.arq_id for s in await sweeper.plan(record)] == [nxt.arq_id(job_id)]
        # every id a stage can have is looked at before a re-drive
        ids = await sweeper._stage_ids(await store.get("table0"))
        assert set(ids) >= {s.arq_id("table0") for s in dag.STAGES if not s.fan_out}
    finally:
        await store.aclose()


async def test_the_local_runner_passes_through_the_tables_states_in_order(data_dir, engines, tmp_path):
    from app.messages import TranscribeOptions
    from workers.local_runner import LocalRunner

    seen: list[str] = []
    runner = LocalRunner(Settings.from_env({}), engines=engines)
    result = await runner.run(
        data_dir / "jfk.flac", TranscribeOptions(formats=("txt",)), tmp_path, on_progress=lambda e: seen.append(e.state)
    )
    assert list(dict.fromkeys(seen)) == list(dag.STATES[1:])
    # its timings are named as the table names its stages
    names = [s.name for s in dag.STAGES]
    timed = list(result.transcript.stats.stages)
    assert timed and set(timed) <= set(names) and timed == sorted(timed, key=names.index)


def test_the_job_page_knows_the_tables_ended_states():
    js = (ROOT / "app" / "web" / "static" / "vtp.js").read_text()
    listed = re.search(r"const TERMINAL = \[([^\]]*)\]", js)
    assert listed, "vtp.js has no TERMINAL list"
    assert tuple(re.findall(r'"(\w+)"', listed.group(1))) == dag.ENDED_STATES
