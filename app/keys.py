"""The artifact key layout in storage: every stage, the submitter and the web process agree on it
here. Every key of a job lives under its own prefix, so deleting a job is one prefix delete.
"""

from __future__ import annotations


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def media_key(job_id: str) -> str:
    return f"jobs/{job_id}/media"


def audio_key(job_id: str) -> str:
    return f"jobs/{job_id}/audio.pcm"


def batch_audio_key(job_id: str, index: int) -> str:
    return f"jobs/{job_id}/batches/{index:05d}.pcm"


def output_key(job_id: str, basename: str, fmt: str) -> str:
    return f"jobs/{job_id}/out/{basename}.{fmt}"


def review_key(job_id: str) -> str:
    """The whole transcript as JSON (``app.formats.to_json``), whatever formats the job asked for:
    what the job page reads for its cues and speech timeline, and renders its subtitles from."""
    return f"jobs/{job_id}/review.json"
