"""The controller is a small process: it imports the shared core (app/), Redis, aiohttp and the
Kubernetes client, never the speech stack, arq or the stages."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.fly_standin import ROOT

HEAVY = ("faster_whisper", "ctranslate2", "onnxruntime", "torch", "transformers", "arq", "workers.stages", "workers.engines")


def test_controller_imports_no_speech_stack():
    code = (
        "import sys, json\n"
        "import app.cli, workers.controller.loop, workers.controller.fly, workers.controller.kube\n"
        "from workers.controller.loop import open_backend\n"
        "app.cli.build_parser().parse_args(['controller', '--backend', 'fly'])\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m in {HEAVY!r})))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []
