"""A directory built once under the cache, atomically: built in a temporary directory beside
its target, then renamed into place. Two processes building at once both end with a complete
copy (the loser's rename fails and it takes the winner's); a crash leaves no half one. A
directory counts as built when its ``marker`` file exists."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def build_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``target``, built by ``build(tmp_dir)`` unless ``target / marker`` is already there."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: its copy is as good as ours
            if not (target / marker).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
