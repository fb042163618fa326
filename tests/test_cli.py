"""``vtp transcribe`` as a user runs it: a subprocess, real files, exit codes, one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support.dag_cluster import ROOT


def vtp(*args, cwd=None, timeout=180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=env,
    )


def test_one_bad_file_does_not_stop_the_others(data_dir, tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    result = vtp("transcribe", empty, data_dir / "no_audio.mp4", data_dir / "jfk.flac", tmp_path / "nope.mkv", tmp_path, "-o", out)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("vtp: error:")]
    assert len(errors) == 4, result.stderr
    assert "empty" in errors[0] and "no audio stream" in errors[1] and "not found" in errors[2] and "directory" in errors[3]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["jfk.json", "jfk.srt", "jfk.txt", "jfk.vtt"]
    assert "ask not what your country can do for you" in (out / "jfk.txt").read_text().lower().replace(",", "").replace("\n", " ")


def test_summary_line_and_formats(data_dir, tmp_path):
    result = vtp("transcribe", data_dir / "jfk.flac", "-o", tmp_path, "--formats", "srt,json", "--quiet")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        r"jfk\.flac: 11\.0 s audio in \d+\.\d s \(\d+\.\dx realtime\) -> \S+jfk\.srt, \S+jfk\.json\n", result.stdout
    ), result.stdout
    assert result.stderr == ""  # --quiet: no progress bar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jfk.json", "jfk.srt"]


def test_speech_that_produced_no_words_is_reported_not_hidden(data_dir, tmp_path):
    """An engine that hears nothing (``noop``): the summary line still comes, then a warning on
    stderr says how much speech produced no words, and the JSON says where."""
    import json

    result = vtp("transcribe", data_dir / "jfk.flac", "-o", tmp_path, "--engine", "noop", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("jfk.flac: 11.0 s audio")
    warning = re.fullmatch(r"vtp: warning: jfk\.flac: (\d+\.\d) s of speech produced no words .*\n", result.stderr)
    assert warning, result.stderr
    doc = json.loads((tmp_path / "jfk.json").read_text())
    assert doc["segments"] == [] and doc["unheard"] == doc["speech"] != []
    assert doc["stats"]["coverage"]["unheard_seconds"] == pytest.approx(float(warning.group(1)), abs=0.06)
    assert "unheard" not in vtp("transcribe", data_dir / "jfk.flac", "-o", tmp_path, "--quiet").stderr


def test_same_stem_twice_keeps_both(data_dir, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "jfk.flac").write_bytes((data_dir / "jfk.flac").read_bytes())
    result = vtp("transcribe", data_dir / "jfk.flac", tmp_path / "a" / "jfk.flac", "-o", tmp_path / "o", "--formats", "txt", "-q")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["jfk-2.txt", "jfk.txt"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--batch-size", "0"], "batch_size"),
        (["--model", "/no/such/model"], "no such model directory"),
        (["--formats", "docx"], "unknown format"),
        (["--language", "../../etc"], "language"),
    ],
)
def test_bad_options_exit_2_with_a_reason(args, words, data_dir, tmp_path):
    result = vtp("transcribe", data_dir / "jfk.flac", "-o", tmp_path, *args)
    assert result.returncode == 2
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_progress_bar_shows_stages(data_dir, tmp_path):
    result = vtp("transcribe", data_dir / "jfk.flac", "-o", tmp_path, "--formats", "txt")
    assert result.returncode == 0
    assert "[transcribing]" in result.stderr and "s speech" in result.stderr


def test_help_lists_the_promised_options():
    text = vtp("transcribe", "--help").stdout
    for option in ("--output-dir", "--formats", "--model", "--engine", "--device", "--compute-type",
                   "--batch-size", "--beam-size", "--language", "--word-timestamps", "--quiet"):
        assert option in text
