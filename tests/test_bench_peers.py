"""The benches compare vtp with faster-whisper's own pipelines as a user runs them: in a process
of their own, where vtp's engine never tuned the allocator (``bench/peers.py``)."""

from __future__ import annotations

import os

import pytest

from bench.peers import Peers


def test_peer_pipelines_run_in_a_process_of_their_own_and_report_their_cost(data_dir):
    peers = Peers()
    try:
        assert peers.pid != os.getpid()
        run = peers.run("batched", data_dir / "jfk.flac")
        assert "ask not what your country can do for you" in run["text"].lower()
        assert run["seconds"] > 0 and run["cpu"] > 0 and run["faults"] > 0
        with pytest.raises(RuntimeError, match="unknown system"):
            peers.run("vtp", data_dir / "jfk.flac")
        assert "ask not" in peers.run("sequential", data_dir / "jfk.flac")["text"].lower()  # still serving
    finally:
        peers.close()
