"""faster-whisper / CTranslate2 engine: the default, fast on CPU with int8.

The model is faster-whisper's ``WhisperModel``; a batch is one encoder pass and one
beam-search ``generate`` call for all its chunks (faster-whisper's batched generation),
decoded *without* timestamp tokens, then word-aligned by cross-attention (DTW) so cues can be
cut at sentence ends and pauses. Whisper's no-speech rule drops a chunk's text when the model
itself says it heard nothing (no hallucinated words in noise).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from app import errors
from app.messages import Chunk, Segment, TranscribeOptions
from workers import cues
from workers.engines.base import (
    FAST, LOGPROB_THRESHOLD, NO_SPEECH_THRESHOLD, Decoding, needs_fallback, said_nothing, token_budget,
)
from workers.engines.models import BUNDLED_MODEL_NAME, bundled_model_path, registry_model_path  # noqa: F401
from workers.engines.whisper_common import (
    NO_SPEECH_BEFORE,
    check_task,
    one_line as _one_line,
    source_word as _word,
    subsegment as _subsegment,
)

log = logging.getLogger(__name__)

#: Whisper's limit on the first timestamp of a window decoded with timestamps (seconds).
MAX_INITIAL_TIMESTAMP = 1.0
#: The seed of the fallback's sampling (temperature > 0).
FALLBACK_SEED = 1
_SAMPLING = threading.Lock()


def resolve_model(name: str) -> str:
    """A directory is used as is; ``tiny.en`` and ``base`` come from the registry's wheels
    (``workers.engines.models``); other names go to the hub."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model.bin").exists():
            raise errors.ModelNotFound(f"{name}: directory holds no CTranslate2 model.bin")
        return str(path)
    local = registry_model_path(name)
    if local is not None:
        return str(local)
    if name.startswith(("/", ".", "~")):
        raise errors.ModelNotFound(f"{name}: no such model directory")
    return name  # a hub name ("large-v3", "Systran/faster-whisper-small"): downloaded on first use


#: Exceptions (by class name, anywhere in the MRO: the hub's HTTP stack varies by version)
#: that mean the hub could not be *reached*, not that the model does not exist.
_NETWORK_ERRORS = frozenset({
    "ConnectionError", "TimeoutError", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout",
    "ReadTimeout", "TimeoutException", "NetworkError", "RemoteProtocolError", "ProtocolError",
})
_MISSING_ON_HUB = frozenset({
    "RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "EntryNotFoundError",
    "HFValidationError", "DisabledRepoError", "OfflineModeIsEnabled",
})


def load_error(exc: BaseException, options: TranscribeOptions, source: str) -> errors.VtpError:
    """Why a model did not load, transient or permanent: out of memory (CUDA OOM) and a network
    error on the way to the hub are retried; a model that is not there, or whose files are
    corrupt, fails the job at once."""
    text = _one_line(exc)
    if "out of memory" in text.lower() or isinstance(exc, MemoryError):
        return errors.ResourceError(f"cannot load model {options.model!r} on {options.device}: out of memory ({text})")
    names = {cls.__name__ for cls in type(exc).__mro__}
    chain: set[str] = set()  # the hub wraps the connection error: look down the causes too
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 200:
        chain |= {cls.__name__ for cls in type(cause).__mro__}
        cause = cause.__cause__ or cause.__context__
    status = getattr(getattr(exc, "response", None), "status_code", None)
    from_hub = not Path(source).is_dir()
    # (LocalEntryNotFoundError is an EntryNotFoundError, but means "offline and not cached")
    missing = bool(names & _MISSING_ON_HUB) and "LocalEntryNotFoundError" not in names
    if from_hub and not missing:
        if chain & _NETWORK_ERRORS or (isinstance(status, int) and (status >= 500 or status == 429)):
            return errors.EngineError(f"cannot load model {options.model!r}: the Hugging Face hub is unreachable ({text})")
    hint = "" if not from_hub else " (not bundled: it is downloaded from the Hugging Face hub on first use)"
    return errors.ModelNotFound(f"cannot load model {options.model!r}{hint}: {text}")


#: Chunks per encoder call and per alignment call on CPU. CTranslate2 holds a whole call's
#: attention scores at once, in float32: 6 heads x 1500 x 1500 frames, 54 MB per chunk for
#: tiny (more for larger models), so a decode batch of 8 peaked ~570 MB above the model in the
#: encoder alone (peak RSS there: 733 MB at 8 chunks per call, 437 at 2, 387 at 1, the model
#: ~160 MB; ``bench/memory_engine.py``). One chunk at a time keeps the
#: peak flat in the batch size and is no slower on CPU (each chunk's matrices are already large);
#: beam search and the batch's tokens still run as one call. GPUs keep the whole batch per call.
CPU_CALL_CHUNKS = 1


def _tune_malloc(arenas: int = 2) -> None:
    """glibc's allocator, for a process that holds a model and decodes batch after batch (what
    ``MALLOC_ARENA_MAX`` sets at start; the variable, when set, wins). Measured with the bundled
    model on 2 cores:

    * ``M_ARENA_MAX`` 2: CTranslate2's and OpenMP's threads each got an arena of their own, which
      kept ~120 MB of freed buffers resident (10-minute input: 1,069 -> 946 MB before the
      one-chunk calls below).
    * Not a fixed ``M_MMAP_THRESHOLD`` (it was 8 MiB): it mapped every buffer of 8 MiB or more
      afresh each time it was needed, and paging them in cost system time, in this process and
      in anything beside it (the 8-minute lecture of the generated corpus, ``bench/time_split.py``
      with and without ``MALLOC_MMAP_THRESHOLD_=8388608``, logs in ``docs/logs/``: vtp 17.0 s
      with 6.4 system seconds and 2.6 M page faults, 15.8 s with 2.8 and 1.0 M without it; the
      batched faster-whisper pipeline 15.6 s against 13.8 s). glibc's sliding threshold keeps
      buffers up to 32 MiB in the heap; ``_trim_heap`` gives back what a batch freed. The fixed
      threshold kept ~80 MB less resident on long inputs (``bench/memory.py``: 546 against 629 MB
      at 1 hour): speed won, the peak stays within the memory targets.

    Threads created from now on get the capped arenas. A no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return
    if not os.environ.get("MALLOC_ARENA_MAX"):
        mallopt(-8, arenas)  # M_ARENA_MAX


_LIBC = None


def _trim_heap() -> None:
    """``malloc_trim(0)``: return the free pages of every malloc arena to the system. Without it,
    ``vtp transcribe``'s peak crept up over a long input (532 MB at 10 min, 631-655 MB at 30-60 min,
    the engine alone flat): each batch's short-lived buffers (features, beam state) landed in holes
    left by the previous ones and the heap grew around them (30-minute input: 655 -> 579 MB, no
    slower). Once per batch. A no-op where the C library is not glibc."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _LIBC = False
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC else None
    if trim is not None:
        trim(0)


#: Bytes of encoder output kept for reuse on CPU (``EncoderCache``): a batch of 8 and the ladder's
#: latest pieces for tiny (2.3 MB a window), a batch for base (3 MB). Resident on top of the
#: engine's peak: measured +49 MB at 48 MiB on a 10-minute input (652 against 603 MB).
ENCODER_CACHE_BYTES = 24 << 20


class EncoderCache:
    """The encoder outputs of the last chunks encoded, by the digest of their features.

    The coverage ladder decodes some audio again that the engine has just encoded: a whole chunk
    with timestamp tokens after the fast decode, a gap's stretch with them after it was decoded
    alone, the temperature fallback after either. The encoder's output depends on the features
    alone (one chunk per call on CPU), so those rungs reuse it instead of encoding the same 30 s
    window again: the results are the same, the encoder's time is not spent twice. Least recently
    used entries go first, past ``limit`` bytes; thread-safe (the engine's workers share it)."""

    def __init__(self, limit: int = ENCODER_CACHE_BYTES) -> None:
        self.limit = limit
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(features: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(features).data, digest_size=16).digest()

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: bytes, output: np.ndarray) -> None:
        with self._lock:
            if key in self._entries or output.nbytes > self.limit:
                return
            self._entries[key] = output
            self._bytes += output.nbytes
            while self._bytes > self.limit:
                _old, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes


def _whisper_model_class(call_chunks: int):
    """faster-whisper's ``WhisperModel`` whose encoder and alignment calls take at most
    ``call_chunks`` chunks at a time (0: the whole batch), and whose encoder reuses what it
    encoded lately (``EncoderCache``). Same results: each chunk's encoder output and alignment
    do not depend on the other chunks of its call."""
    from faster_whisper import WhisperModel

    if call_chunks <= 0:
        return WhisperModel

    class LeanWhisperModel(WhisperModel):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.encoded = EncoderCache()

        def encode(self, features: np.ndarray):
            import ctranslate2

            _trim_heap()  # a batch starts: give back what the last one freed (see _trim_heap)
            if features.ndim == 2:
                features = features[None]
            keys = [EncoderCache.key(f) for f in features]
            found = [self.encoded.get(k) for k in keys]
            todo = [i for i, f in enumerate(found) if f is None]
            for at in range(0, len(todo), call_chunks):
                rows = todo[at : at + call_chunks]
                out = np.asarray(super().encode(np.ascontiguousarray(features[rows])))
                for j, i in enumerate(rows):
                    found[i] = np.array(out[j])
                    self.encoded.put(keys[i], found[i])
            return ctranslate2.StorageView.from_array(np.stack(found))

        def find_alignment(self, tokenizer, text_tokens, encoder_output, num_frames, median_filter_width=7):
            rows = len(text_tokens)
            if rows <= call_chunks:
                return super().find_alignment(tokenizer, text_tokens, encoder_output, num_frames, median_filter_width)
            import ctranslate2

            array = np.asarray(encoder_output)
            out: list = []
            for i in range(0, rows, call_chunks):
                part = ctranslate2.StorageView.from_array(np.ascontiguousarray(array[i : i + call_chunks]))
                frames = num_frames[i : i + call_chunks] if isinstance(num_frames, list) else num_frames
                out.extend(super().find_alignment(tokenizer, text_tokens[i : i + call_chunks], part, frames,
                                                  median_filter_width))
            return out

    return LeanWhisperModel


class FasterWhisperEngine:
    name = "ctranslate2"

    def __init__(self, model, model_name: str, workers: int = 1) -> None:
        self.model = model
        self.model_name = model_name
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ct2") if workers > 1 else None

    @classmethod
    def load(cls, options: TranscribeOptions) -> FasterWhisperEngine:
        source = resolve_model(options.model)
        device = options.device
        compute_type = options.compute_type
        # On CPU, two CTranslate2 workers decoding halves of a batch beat one worker using every
        # core (small Whisper matrices do not keep two threads busy): ~10% measured on 2 cores of
        # an Intel Xeon; on an AMD EPYC within the noise, the same text either way
        # (docs/logs/experiments/engine_threads.log). Two workers also let the coverage ladder
        # run a rung's next decode beside a rung of one piece (``Engine.parallel_calls``).
        cores = os.cpu_count() or 1
        workers = 2 if device == "cpu" and cores >= 2 else 1
        if device == "cpu":
            _tune_malloc()
        WhisperModel = _whisper_model_class(CPU_CALL_CHUNKS if device == "cpu" else 0)
        try:
            model = WhisperModel(
                source,
                device=device,
                compute_type=compute_type,
                cpu_threads=max(1, cores // workers),
                num_workers=workers,
            )
        except ValueError as exc:  # CTranslate2 rejects an unsupported compute type/device this way
            raise errors.OptionsError(f"cannot load {options.model} on {device}/{compute_type}: {_one_line(exc)}") from exc
        except Exception as exc:  # hub errors, corrupt model files, missing CUDA, out of memory
            raise load_error(exc, options, source) from exc
        return cls(model, options.model, workers)

    @property
    def parallel_calls(self) -> int:
        """Calls that run at once to advantage: one per CTranslate2 worker (``Engine``)."""
        return self.workers

    @property
    def multilingual(self) -> bool:
        return bool(self.model.model.is_multilingual)

    def detect_languages(self, audio: list[np.ndarray]) -> list[tuple[str, float]]:
        """Each chunk's most likely language and its probability (one encoder pass for all)."""
        if not self.multilingual:
            return [("en", 1.0)] * len(audio)
        if not audio:
            return []
        from faster_whisper.audio import pad_or_trim

        try:
            extractor = self.model.feature_extractor
            features = np.stack([pad_or_trim(extractor(a)[..., :-1]) for a in audio])
            results = self.model.model.detect_language(self.model.encode(features))
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise errors.EngineError(f"{self.name} engine failed detecting the language of {len(audio)} chunks: {exc}") from exc
        return [(r[0][0][2:-2], float(r[0][1])) for r in results]

    def _tokenizer(self, language: str, task: str = "transcribe"):
        from faster_whisper.tokenizer import Tokenizer

        check_task(self.multilingual, task, self.model_name)
        return Tokenizer(self.model.hf_tokenizer, self.multilingual, task=task, language=language)

    def _language(self, features: np.ndarray, options: TranscribeOptions) -> str:
        if not self.model.model.is_multilingual:
            return "en"
        if options.language:
            return options.language
        # One guess per batch from its longest chunk; merge takes the majority by audio time.
        lang, _prob, _all = self.model.detect_language(features=features)
        return lang

    def _transcription_options(self, options: TranscribeOptions):
        from faster_whisper.transcribe import TranscriptionOptions

        return TranscriptionOptions(
            beam_size=options.beam_size,
            best_of=5,
            patience=1.0,
            length_penalty=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            log_prob_threshold=LOGPROB_THRESHOLD,
            no_speech_threshold=NO_SPEECH_THRESHOLD,
            compression_ratio_threshold=2.4,
            condition_on_previous_text=False,
            prompt_reset_on_temperature=0.5,
            temperatures=[0.0],
            initial_prompt=None,
            prefix=None,
            suppress_blank=True,
            suppress_tokens=[-1],
            without_timestamps=True,
            max_initial_timestamp=0.0,
            word_timestamps=options.word_timestamps,
            prepend_punctuations="\"'“¿([{-",
            append_punctuations="\"'.。,，!！?？:：”)]}、",
            multilingual=False,
            max_new_tokens=None,
            clip_timestamps="0",
            hallucination_silence_threshold=None,
            hotwords=None,
        )

    def transcribe_batch(
        self, audio: list[np.ndarray], chunks: list[Chunk], options: TranscribeOptions, decoding: Decoding = FAST
    ) -> tuple[list[Segment], str]:
        if self._pool is None or len(audio) < 2:
            return self._transcribe_part(audio, chunks, options, decoding)
        n = len(audio)
        bounds = [round(i * n / self.workers) for i in range(self.workers + 1)]
        futures = [
            self._pool.submit(self._transcribe_part, audio[a:b], chunks[a:b], options, decoding)
            for a, b in zip(bounds, bounds[1:])
            if b > a
        ]
        parts = [f.result() for f in futures]
        return [seg for segs, _lang in parts for seg in segs], parts[0][1]

    def _transcribe_part(
        self, audio: list[np.ndarray], chunks: list[Chunk], options: TranscribeOptions, decoding: Decoding = FAST
    ) -> tuple[list[Segment], str]:
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.transcribe import get_suppressed_tokens

        if not audio:
            return [], options.language or "en"
        try:
            extractor = self.model.feature_extractor
            features = np.stack([pad_or_trim(extractor(a)[..., :-1]) for a in audio])
            longest = max(range(len(audio)), key=lambda i: audio[i].size)
            language = self._language(features[longest], options)
            tokenizer = self._tokenizer(language, options.task)
            tr_options = self._transcription_options(options)
            tr_options.suppress_tokens = get_suppressed_tokens(tokenizer, tr_options.suppress_tokens)
            encoder_output = self.model.encode(features)
            seconds = audio[longest].size / 16000
            outputs = self._generate(encoder_output, len(audio), tokenizer, tr_options, decoding, seconds, language)
            spoken = [
                i
                for i, out in enumerate(outputs)
                if any(t < tokenizer.eot for t in out["tokens"])
                # Whisper's own verdict that nothing was said: no hallucinated words in noise.
                and not said_nothing(out["no_speech_prob"], out["avg_logprob"])
            ]
            aligned = self._align(spoken, outputs, chunks, audio, encoder_output, tokenizer, tr_options)
        except errors.VtpError:
            raise
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise errors.EngineError(f"{self.name} engine failed on a batch of {len(audio)} chunks: {exc}") from exc
        segments: list[Segment] = []
        for i, sub in zip(spoken, aligned):
            out = outputs[i]
            segments.extend(
                cues.split_into_cues(
                    chunks[i],
                    tokenizer.decode(sub["tokens"]),
                    [_word(w, chunks[i]) for w in sub.get("words", [])],
                    keep_words=options.word_timestamps,
                    avg_logprob=float(out["avg_logprob"]),
                    no_speech_prob=float(out["no_speech_prob"]),
                )
            )
        return segments, language

    def _generate(
        self, encoder_output, rows: int, tokenizer, tr_options, decoding: Decoding, seconds: float, language: str,
    ) -> list[dict]:
        """One batched ``generate`` per temperature of ``decoding``: every row at the first
        (beam search at 0, as faster-whisper's batched pipeline calls it), then only the rows
        that fail Whisper's checks (``needs_fallback``) at the next, sampling best of 5. With
        ``decoding.timestamps`` the prompt asks for timestamp tokens and CTranslate2 applies
        Whisper's timestamp rules (first timestamp within 1 s), as sequential Whisper decodes."""
        import ctranslate2

        prompt = self.model.get_prompt(tokenizer, [], without_timestamps=not decoding.timestamps)
        common = dict(
            length_penalty=tr_options.length_penalty,
            max_length=len(prompt) + token_budget(seconds, language, self.model.max_length - len(prompt)),
            suppress_blank=tr_options.suppress_blank,
            suppress_tokens=tr_options.suppress_tokens,
            return_scores=True,
            return_no_speech_prob=True,
            repetition_penalty=tr_options.repetition_penalty,
            no_repeat_ngram_size=tr_options.no_repeat_ngram_size,
        )
        if decoding.timestamps:
            common["max_initial_timestamp_index"] = int(round(MAX_INITIAL_TIMESTAMP / self.model.time_precision))
        outputs: list[dict] = [{}] * rows
        todo = list(range(rows))
        for temperature in decoding.temperatures:
            if temperature > 0:
                search = dict(beam_size=1, num_hypotheses=tr_options.best_of, sampling_topk=0,
                              sampling_temperature=temperature)
                # the same samples for the same audio, every run: the seed is CTranslate2's global
                # one, so the engine's two decoding threads take turns while they sample
                with _SAMPLING:
                    ctranslate2.set_random_seed(FALLBACK_SEED)
                    results = self.model.model.generate(
                        _select(encoder_output, todo, rows), [list(prompt) for _ in todo], **common, **search
                    )
            else:
                search = dict(beam_size=tr_options.beam_size, patience=tr_options.patience)
                results = self.model.model.generate(
                    _select(encoder_output, todo, rows), [list(prompt) for _ in todo], **common, **search
                )
            failed = []
            for row, result in zip(todo, results):
                tokens = result.sequences_ids[0]
                # faster-whisper's recovery of the average log-probability from the score
                avg_logprob = result.scores[0] * (len(tokens) ** tr_options.length_penalty) / (len(tokens) + 1)
                outputs[row] = {"tokens": tokens, "avg_logprob": avg_logprob, "no_speech_prob": result.no_speech_prob,
                                "temperature": temperature}
                text = tokenizer.decode([t for t in tokens if t < tokenizer.eot])
                if needs_fallback(text, avg_logprob, result.no_speech_prob):
                    failed.append(row)
            todo = failed
            if not todo:
                break
        return outputs

    def _align(self, spoken, outputs, chunks, audio, encoder_output, tokenizer, tr_options) -> list[dict]:
        """Word timings by cross-attention alignment (DTW), one sub-segment per chunk.

        Decoding runs without timestamp tokens (faster, and Whisper cannot end a window early
        on a timestamp and drop the words after it); cue boundaries come from these words.
        """
        fps = self.model.frames_per_second
        subs = [_subsegment(outputs[i]["tokens"], chunks[i]) for i in spoken]
        if subs:
            self.model.add_word_timestamps(
                subs,
                tokenizer,
                _select(encoder_output, spoken, len(audio)),
                [int(np.ceil(audio[i].size / 16000) * fps) for i in spoken],
                tr_options.prepend_punctuations,
                tr_options.append_punctuations,
                NO_SPEECH_BEFORE,
            )
        return [s[0] for s in subs]


def _select(encoder_output, rows: list[int], total: int):
    """The encoder output of some rows of the batch (alignment runs on those with speech)."""
    if len(rows) == total:
        return encoder_output
    import ctranslate2

    if encoder_output.device != "cpu":
        encoder_output = encoder_output.to_device(ctranslate2.Device.cpu)
    array = np.asarray(encoder_output)
    return ctranslate2.StorageView.from_array(np.ascontiguousarray(array[rows]))
