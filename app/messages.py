"""Every message that crosses a stage or process boundary, one msgspec ``Struct`` each.

Stages take one of these and return one of these; the queue runtime sends them through Redis
as msgpack and decodes them *with their type*, so a malformed message fails loudly at the
edge with the path of the bad field (``decode``) instead of deep inside a stage.

Times are seconds from the start of the input media, always absolute.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from app import costs, errors

SAMPLE_RATE = 16000
#: Whisper sees exactly 30 s per window; a chunk longer than this is silently truncated.
WHISPER_WINDOW_S = 30.0

Format = Literal["txt", "srt", "vtt", "json"]
ALL_FORMATS: tuple[Format, ...] = ("txt", "srt", "vtt", "json")


class TranscribeOptions(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the user asked for; travels with the job through every stage."""

    #: ``noop`` returns no segments at once: for measuring the queue itself (bench/queue_overhead.py).
    #: ``transformers``: Whisper on torch (workers/engines/transformers.py), the GPU engine.
    #: engine, device and compute_type are honoured by ``vtp transcribe``; a GPU worker uses its
    #: own (``VTP_ENGINE``, ``VTP_DEVICE``, ``VTP_COMPUTE_TYPE``) whatever a job carries.
    engine: Literal["ctranslate2", "noop", "transformers"] = "ctranslate2"
    #: A directory holding a model, or a model name; ``tiny.en`` is the bundled default.
    model: str = "tiny.en"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    compute_type: str = "int8"
    batch_size: Annotated[int, Meta(ge=1, le=256)] = 8
    beam_size: Annotated[int, Meta(ge=1, le=16)] = 5
    #: The spoken language (a code of ``app.languages.LANGUAGES``); None: detected once per job,
    #: from its first speech, before any of its chunks is decoded (``workers.languages``).
    language: Annotated[str, Meta(min_length=2, max_length=8, pattern=r"^[a-z]{2,3}(-[A-Za-z]+)?$")] | None = None
    #: ``translate``: English text whatever the language spoken (multilingual models only).
    task: Literal["transcribe", "translate"] = "transcribe"
    #: With no ``language``: detect it for every chunk on its own (mixed-language media) instead
    #: of once per job; each chunk is still decoded in one concrete language.
    language_per_chunk: bool = False
    word_timestamps: bool = False
    formats: tuple[Format, ...] = ALL_FORMATS


class ExtractRequest(Struct, frozen=True, kw_only=True):
    job_id: str
    #: Storage key of the uploaded media.
    media_key: str
    #: Display name of the input (never used as a path).
    source_name: str = ""


class ExtractedAudio(Struct, frozen=True, kw_only=True):
    #: Storage key of 16 kHz mono signed 16-bit little-endian PCM.
    audio_key: str
    duration: float
    sample_rate: int = SAMPLE_RATE


class Chunk(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A stretch of audio of at most one Whisper window, cut at pauses."""

    index: int
    start: float
    end: float
    #: The speech regions the VAD found inside it: each must come back covered by words
    #: (``workers.coverage``), or that stretch is decoded again on its own.
    speech: list[tuple[float, float]] = []
    #: A loud stretch the VAD rejected (``workers.levels``): its words are kept only where
    #: Whisper itself is sure it heard speech.
    probe: bool = False
    #: Where the chunk's audio comes from when long pauses inside it were cut out: source spans
    #: (seconds), whose audio is joined in order. Empty: all of ``[start, end]``. Engines time
    #: words in the joined audio and map them back with ``to_source``.
    pieces: list[tuple[float, float]] = []

    @property
    def spans(self) -> list[tuple[float, float]]:
        return self.pieces or [(self.start, self.end)]

    @property
    def duration(self) -> float:
        """Seconds of audio the engine hears (the cut pauses are not in it)."""
        return sum(e - s for s, e in self.spans)

    @property
    def sample_range(self) -> tuple[int, int]:
        """The source samples from the first to the last heard, cut pauses included."""
        return round(self.start * SAMPLE_RATE), round(self.end * SAMPLE_RATE)

    @property
    def sample_ranges(self) -> list[tuple[int, int]]:
        """The source samples the engine hears, one range per piece."""
        return [(round(s * SAMPLE_RATE), round(e * SAMPLE_RATE)) for s, e in self.spans]

    @property
    def samples(self) -> int:
        return sum(e - s for s, e in self.sample_ranges)

    def to_source(self, t: float) -> float:
        """Seconds into the chunk's (joined) audio -> seconds in the source."""
        offset = 0.0
        for s, e in self.spans:
            if t <= offset + (e - s):
                return s + max(0.0, t - offset)
            offset += e - s
        return self.end

    def to_heard(self, t: float) -> float:
        """Seconds in the source -> seconds into the chunk's audio (a cut pause maps to its edge)."""
        offset = 0.0
        for s, e in self.spans:
            if t <= e:
                return offset + max(0.0, t - s)
            offset += e - s
        return offset

    def span_around(self, start: float, end: float) -> tuple[float, float]:
        """The piece that holds most of ``[start, end]``."""
        return max(self.spans, key=lambda p: min(p[1], end) - max(p[0], start))


class ChunkBatch(Struct, frozen=True, kw_only=True):
    """The unit of fan-out: chunks transcribed together, with their audio stored beside them."""

    index: int
    chunks: list[Chunk]
    #: Storage key of the batch's chunks' PCM, concatenated in order.
    audio_key: str

    @property
    def audio_seconds(self) -> float:
        return sum(c.duration for c in self.chunks)


class SegmentRequest(Struct, frozen=True, kw_only=True):
    job_id: str
    audio: ExtractedAudio
    options: TranscribeOptions


class Segmentation(Struct, frozen=True, kw_only=True):
    chunks: list[Chunk]
    batches: list[ChunkBatch]
    speech_seconds: float


class Word(Struct, frozen=True, kw_only=True, omit_defaults=True):
    start: float
    end: float
    word: str
    probability: float = 0.0


class Segment(Struct, frozen=True, kw_only=True, omit_defaults=True):
    start: float
    end: float
    text: str
    words: list[Word] | None = None
    #: Which chunk produced it: lets merge order and de-duplicate across retries.
    chunk: int = 0
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0


class TranscribeRequest(Struct, frozen=True, kw_only=True):
    job_id: str
    batch: ChunkBatch
    options: TranscribeOptions


class LanguageRequest(Struct, frozen=True, kw_only=True):
    """A job's batches, in order: the first chunks among them (its first speech) vote on its
    language (``workers.stages.detect_language``)."""

    job_id: str
    batches: list[ChunkBatch]
    options: TranscribeOptions


class CoverageStats(Struct, frozen=True, kw_only=True):
    """What the transcribe stage did so that no speech is lost (``workers.coverage``)."""

    #: Stretches of VAD speech that came back without words (or with implausibly few) and went
    #: up the decoding ladder, and how many of those then gave words (with their seconds).
    gaps: int = 0
    repaired: int = 0
    repaired_seconds: float = 0.0
    #: Loud stretches the VAD rejected that went to Whisper, and those kept as speech.
    probes: int = 0
    rescued: int = 0
    rescued_seconds: float = 0.0
    #: Seconds of VAD speech that no rung of the ladder turned into words: where speech may be
    #: missing from the transcript (or the VAD heard noise). The spans are in ``Transcript.unheard``.
    unheard_seconds: float = 0.0
    #: Ladder rung name -> suspects that climbed to that rung (how often each rung fired), and
    #: -> suspects whose words that rung made plausible (where they stopped climbing).
    rungs: dict[str, int] = {}
    settled: dict[str, int] = {}
    #: Decodes of a next rung run beside a small call (on an idle CPU worker) that no suspect
    #: needed in the end: work that cost no wall time.
    ahead: int = 0
    #: Ladder rung name -> wall seconds its engine calls took (a decode of the next rung run
    #: beside it included): what the ladder cost this job, rung by rung.
    ladder_seconds: dict[str, float] = {}

    def __add__(self, other: CoverageStats) -> CoverageStats:
        return CoverageStats(
            gaps=self.gaps + other.gaps,
            repaired=self.repaired + other.repaired,
            repaired_seconds=round(self.repaired_seconds + other.repaired_seconds, 3),
            probes=self.probes + other.probes,
            rescued=self.rescued + other.rescued,
            rescued_seconds=round(self.rescued_seconds + other.rescued_seconds, 3),
            unheard_seconds=round(self.unheard_seconds + other.unheard_seconds, 3),
            rungs=_sum_counts(self.rungs, other.rungs),
            settled=_sum_counts(self.settled, other.settled),
            ahead=self.ahead + other.ahead,
            ladder_seconds={k: round(v, 3) for k, v in _sum_counts(self.ladder_seconds, other.ladder_seconds).items()},
        )


_N = TypeVar("_N", int, float)


def _sum_counts(a: dict[str, _N], b: dict[str, _N]) -> dict[str, _N]:
    out = dict(a)
    for name, n in b.items():
        out[name] = out.get(name, 0) + n
    return out


class BatchTranscript(Struct, frozen=True, kw_only=True):
    batch_index: int
    segments: list[Segment]
    language: str
    audio_seconds: float
    wall_seconds: float
    coverage: CoverageStats = CoverageStats()
    #: The VAD's speech in this batch's chunks (source seconds, merged), and the part of it no
    #: word covers after the ladder (``workers.coverage``): what the job page draws.
    speech: list[tuple[float, float]] = []
    unheard: list[tuple[float, float]] = []


class StageTiming(Struct, frozen=True, kw_only=True):
    stage: str
    seconds: float


class TranscriptStats(Struct, frozen=True, kw_only=True):
    engine: str
    model: str
    chunks: int
    speech_seconds: float
    coverage: CoverageStats = CoverageStats()
    #: Filled in by the runner once every stage has finished.
    wall_seconds: float = 0.0
    realtime_factor: float = 0.0
    stages: dict[str, float] = {}


class Transcript(Struct, frozen=True, kw_only=True):
    #: The language spoken (the source language, also when ``task`` is ``translate``).
    language: str
    duration: float
    segments: list[Segment]
    stats: TranscriptStats
    #: Where the VAD heard speech, and the part of it that produced no words (source seconds,
    #: sorted, disjoint): ``stats.coverage.unheard_seconds`` is the length of ``unheard``.
    speech: list[tuple[float, float]] = []
    unheard: list[tuple[float, float]] = []
    #: ``transcribe``, or ``translate`` (the text is English).
    task: str = "transcribe"

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments if s.text.strip())


class MergeRequest(Struct, frozen=True, kw_only=True):
    job_id: str
    audio: ExtractedAudio
    segmentation: Segmentation
    parts: list[BatchTranscript]
    options: TranscribeOptions


class RenderRequest(Struct, frozen=True, kw_only=True):
    job_id: str
    transcript: Transcript
    formats: tuple[Format, ...]
    #: File stem of the outputs (already sanitised).
    basename: str


class Rendered(Struct, frozen=True, kw_only=True):
    #: format -> storage key
    outputs: dict[str, str]


Stage = Literal["queued", "extracting", "segmenting", "transcribing", "merging", "rendering", "done", "failed", "cancelled"]


class ProgressEvent(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Published while a job runs: drives the CLI bar, ``submit --wait`` and the web page."""

    job_id: str
    state: Stage
    chunks_done: int = 0
    chunks_total: int = 0
    audio_done: float = 0.0
    audio_total: float = 0.0
    message: str = ""


_decoders: dict[type, msgspec.msgpack.Decoder] = {}
_encoder = msgspec.msgpack.Encoder()


def encode(msg: Struct) -> bytes:
    return _encoder.encode(msg)


T = TypeVar("T")


def decode(data: bytes, type_: type[T]) -> T:
    """Decode msgpack into ``type_``; a malformed message raises ``JobError`` naming the bad field."""
    dec = _decoders.get(type_)
    if dec is None:
        dec = _decoders[type_] = msgspec.msgpack.Decoder(type_)
    try:
        return dec.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass and carries the field path
        raise errors.JobError(f"malformed {type_.__name__} message: {exc}") from exc


def options_from(values: dict) -> TranscribeOptions:
    """Build options from loosely typed input (CLI, HTTP form), validating every field.

    Every entry point (``vtp transcribe``/``submit``, the jobs API, the OpenAI endpoint) goes
    through here, so a language Whisper does not know (``en-US``, ``xx``) is refused at once
    with ``OptionsError`` (a 400, a usage error), not after a job's tries on a GPU worker; and
    translation needs a multilingual model (not an English-only ``.en`` one).
    """
    try:
        options = msgspec.convert({k: v for k, v in values.items() if v is not None}, TranscribeOptions)
    except msgspec.ValidationError as exc:
        raise errors.OptionsError(f"invalid option: {exc}") from exc
    check_language(options.language)
    check_task(options)
    return options


def check_language(code: str | None) -> None:
    """``OptionsError`` unless ``code`` is None or one of Whisper's language codes (``app.languages``)."""
    from app.languages import LANGUAGES

    if code is None or code in LANGUAGES:
        return
    base = code.split("-")[0].lower()
    hint = f"; use {base!r} ({LANGUAGES[base]})" if base in LANGUAGES else ""
    raise errors.OptionsError(
        f"language {code!r} is not one Whisper knows{hint}: give a code such as en, de, fr, es, zh or yue"
        " (app/languages.py lists all of them)"
    )


def english_only_model(name: str) -> bool:
    """Whether a model name says English-only (``tiny.en``, ``/models/whisper-small.en``), without
    loading it: what the web process and the CLI check before a translate request."""
    return name.rstrip("/").rsplit("/", 1)[-1].lower().endswith(".en")


def check_task(options: TranscribeOptions) -> None:
    """Translation needs a multilingual model: refuse it for an English-only one, clearly."""
    if options.task == "translate" and english_only_model(options.model):
        raise errors.OptionsError(
            f"model {options.model!r} is English-only and cannot translate: use a multilingual model "
            "such as base (pip install 'vtp[multilingual]')"
        )


class JobCost(Struct, frozen=True, kw_only=True):
    """What a job cost (``JobCost.of``), as an API shows it beside the managed-STT price."""

    machine_seconds: float
    cost_usd: float
    #: $ per hour of media; None before the duration is known.
    per_audio_hour_usd: float | None
    #: Managed speech-to-text list prices per audio hour, for comparison.
    managed_stt_per_audio_hour_usd: tuple[float, float]

    @classmethod
    def of(cls, record: JobRecord) -> JobCost | None:
        """The record's cost for an API (``GET /v1/jobs/{id}``); None when nothing was recorded."""
        seconds = sum(record.machine_seconds.values())
        if seconds <= 0:
            return None
        rate = costs.per_audio_hour(record.cost_usd, record.duration)
        return cls(
            machine_seconds=round(seconds, 3),
            cost_usd=round(record.cost_usd, 6),
            per_audio_hour_usd=None if rate is None else round(rate, 4),
            managed_stt_per_audio_hour_usd=costs.MANAGED_STT_PER_AUDIO_HOUR,
        )


TERMINAL_STATES: frozenset[str] = frozenset({"done", "failed", "cancelled"})


class WebhookAttempt(Struct, frozen=True, kw_only=True):
    """One delivery attempt of a job's webhook (``app.webhooks``)."""

    #: Unix seconds when it was made.
    at: float
    #: HTTP status of the receiver's answer (0: no answer: refused, timed out, unreachable).
    status: int = 0
    error: str = ""
    #: Seconds until the next attempt (0: none: delivered or given up).
    retry_in: float = 0.0


class WebhookDelivery(Struct, kw_only=True):
    """The webhook of a finished job: sent by the CPU workers' ``webhook`` task."""

    #: ``webhook-id``: the same on every attempt, so receivers can deduplicate.
    id: str
    #: ``job.completed``, ``job.failed`` or ``job.cancelled``.
    event: str
    state: Literal["pending", "delivered", "failed"] = "pending"
    attempts: list[WebhookAttempt] = []


class JobRecord(Struct, kw_only=True):
    """One distributed job, as stored in Redis (``app.jobs.JobStore``) and shown by ``vtp status``.

    Times are Unix seconds. ``state`` moves along ``queued -> extracting -> segmenting ->
    transcribing -> merging -> rendering -> done``, or to ``failed``/``cancelled`` from any
    non-final state (``app.dag.check_transition``).
    """

    id: str
    owner: str = ""
    #: Display name of the input (the uploaded file's name).
    input_name: str = ""
    #: File stem of the outputs (already sanitised).
    basename: str = "transcript"
    media_key: str = ""
    sha256: str = ""
    idempotency_key: str = ""
    options: TranscribeOptions = msgspec.field(default_factory=TranscribeOptions)
    state: Stage = "queued"
    created_at: float = 0.0
    updated_at: float = 0.0
    #: When the current state was entered (the next transition turns it into a timing).
    state_since: float = 0.0
    finished_at: float = 0.0
    #: Media duration, known after extraction.
    duration: float = 0.0
    chunks_done: int = 0
    chunks_total: int = 0
    #: Seconds of speech transcribed / to transcribe.
    audio_done: float = 0.0
    audio_total: float = 0.0
    #: Seconds of VAD speech that produced no words (``CoverageStats.unheard_seconds``), known
    #: after merge: where speech may be missing from the transcript.
    unheard_seconds: float = 0.0
    #: Seconds spent in each state: queue, extract, segment, transcribe, merge, render.
    timings: dict[str, float] = {}
    #: Seconds each stage's arq job waited in its queue before a worker started it (the
    #: transition latency; for transcribe, the longest wait of its batches).
    waits: dict[str, float] = {}
    error: str = ""
    #: format -> storage key of the rendered output.
    outputs: dict[str, str] = {}
    #: Where to POST the Standard Webhooks event when the job ends (checked against the SSRF guard).
    webhook_url: str = ""
    #: Its delivery, once the job has ended.
    webhook: WebhookDelivery | None = None
    #: Machine seconds each stage used, every try included (``app.costs``).
    machine_seconds: dict[str, float] = {}
    #: What those seconds cost at the machines' $/hour (``VTP_MACHINE_PRICE_HOUR``).
    cost_usd: float = 0.0
    #: The language detected for the job (options named none): set once, by the first transcribe
    #: stage to detect it, and then used by every batch of the job (``JobStore.settle_language``).
    language: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def wall_seconds(self) -> float:
        end = self.finished_at or self.updated_at
        return max(end - self.created_at, 0.0)


class JobProgress(Struct, frozen=True, kw_only=True):
    chunks_done: int
    chunks_total: int
    audio_done: float
    audio_total: float
    #: 0..1 of the speech transcribed (1 once done).
    fraction: float


class JobView(Struct, frozen=True, kw_only=True):
    """A job as the web API shows it (``GET /v1/jobs/{id}``) and as webhooks carry it."""

    id: str
    status: Stage
    input_name: str
    created_at: float
    finished_at: float | None
    #: Media seconds (known after extraction).
    duration: float
    progress: JobProgress
    #: Seconds in each stage (queue, extract, segment, transcribe, merge, render).
    timings: dict[str, float]
    wall_seconds: float
    #: Media seconds per wall second, once done.
    realtime_factor: float | None
    error: str | None
    model: str
    #: The language asked for, else the one detected for the job (None until detected).
    language: str | None
    #: ``transcribe`` or ``translate``.
    task: str
    #: Formats ready to download (``GET /v1/jobs/{id}/transcript.{fmt}``).
    formats: list[str]
    webhook: WebhookDelivery | None = None
    #: Machine time and its price, beside managed STT's (``app.costs``); None until recorded.
    cost: JobCost | None = None
    #: Seconds of VAD speech that produced no words (the transcript JSON's ``unheard`` spans).
    unheard_seconds: float = 0.0

    @classmethod
    def of(cls, r: JobRecord) -> JobView:
        total = r.audio_total
        fraction = 1.0 if r.state == "done" else (min(r.audio_done / total, 1.0) if total > 0 else 0.0)
        wall = r.wall_seconds
        return cls(
            id=r.id,
            status=r.state,
            input_name=r.input_name,
            created_at=r.created_at,
            finished_at=r.finished_at or None,
            duration=round(r.duration, 3),
            progress=JobProgress(
                chunks_done=r.chunks_done,
                chunks_total=r.chunks_total,
                audio_done=round(r.audio_done, 3),
                audio_total=round(total, 3),
                fraction=round(fraction, 4),
            ),
            timings=r.timings,
            wall_seconds=round(wall, 3),
            realtime_factor=round(r.duration / wall, 2) if r.state == "done" and wall > 0 else None,
            error=r.error or None,
            model=r.options.model,
            language=r.options.language or r.language or None,
            task=r.options.task,
            formats=sorted(r.outputs),
            webhook=r.webhook,
            cost=JobCost.of(r),
            unheard_seconds=round(r.unheard_seconds, 3),
        )


class WebhookEvent(Struct, frozen=True, kw_only=True):
    """The body of a webhook (Standard Webhooks' ``type`` / ``timestamp`` / ``data``)."""

    type: str
    #: ISO 8601, UTC.
    timestamp: str
    data: JobView
