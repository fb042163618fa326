"""Cost accounting: prices, $ per audio hour, and JobStore.add_usage on a real Redis."""

from __future__ import annotations

import pytest

from app import costs
from app.config import Settings
from app.jobs import JobStore
from app.messages import JobCost, JobRecord

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_prices_and_rates():
    assert costs.price_per_hour(Settings.from_env({"VTP_MACHINE_KIND": "a100-40gb"})) == 2.50
    assert costs.price_per_hour(Settings.from_env({"VTP_MACHINE_KIND": "a100-40gb", "VTP_MACHINE_PRICE_HOUR": "1.9"})) == 1.9
    assert costs.price_per_hour(Settings.from_env({"VTP_MACHINE_KIND": "my-laptop"})) == 0.0
    # a worker running 4 jobs at once charges each a quarter of the machine
    s = Settings.from_env({"VTP_MACHINE_PRICE_HOUR": "3.6"})
    assert costs.rate_per_slot_second(s, 4) == pytest.approx(0.00025)
    assert costs.per_audio_hour(0.5, 1800) == 1.0 and costs.per_audio_hour(1.0, 0) is None


def test_summary_and_api_view():
    r = JobRecord(id="j", duration=3600.0, machine_seconds={"transcribe": 100.0, "extract": 20.0}, cost_usd=0.12)
    assert costs.summary(r) == "120.0 machine-s, $0.1200 ($0.12 per audio hour; managed STT $0.18-$2.16)"
    view = JobCost.of(r)
    assert view.machine_seconds == 120.0 and view.per_audio_hour_usd == 0.12
    assert view.managed_stt_per_audio_hour_usd == (0.18, 2.16)
    assert costs.summary(JobRecord(id="k")) == "" and JobCost.of(JobRecord(id="k")) is None


async def test_add_usage_accumulates_also_after_the_job_ended(redis_url):
    store = JobStore.open(redis_url, result_ttl=600)
    try:
        await store.create(JobRecord(id="j1"))
        await store.add_usage("j1", "transcribe", 2.0, 0.001)
        await store.add_usage("j1", "transcribe", 3.0, 0.002)
        await store.add_usage("j1", "extract", 1.5, 0.0)
        await store.fail("j1", "boom")
        await store.add_usage("j1", "render", 0.5, 0.0005)  # a stage that finished after the end
        r = await store.get("j1")
        assert r.machine_seconds == {"transcribe": 5.0, "extract": 1.5, "render": 0.5}
        assert r.cost_usd == pytest.approx(0.0035) and r.state == "failed"
    finally:
        await store.aclose()
