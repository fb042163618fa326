"""The corpus bench's table renders every committed run's log, whatever systems it ran."""

import json
from pathlib import Path

import pytest

from bench.corpus_eval import SYSTEMS, table

LOGS = sorted((Path(__file__).resolve().parents[1] / "docs").glob("corpus_eval*.jsonl"))


@pytest.mark.parametrize("log", LOGS, ids=[p.name for p in LOGS])
def test_every_committed_corpus_log_renders_its_table(log):
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    head, rows = lines[0]["run"], lines[1:]
    names = tuple(n for n in SYSTEMS if n in head["systems"])
    text = table(rows, names)
    body = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(body) == 1 + len(rows) + 1  # header, one row per input, the total
    assert body[-1].startswith(f"| **all {len(rows)}**")
    # runs lost against sequential only where it ran (corpus_eval_ladder.jsonl: vtp and vtp0 alone)
    assert ("lost vs seq" in text) == ("sequential" in names)
