"""transformers engine: Whisper as ``WhisperForConditionalGeneration`` (the insanely-fast-whisper
recipe without its CLI): fp16/bf16 on CUDA, SDPA attention (FlashAttention-2 when installed),
one encoder pass and one batched ``generate`` per batch of VAD chunks.

It produces what the CTranslate2 engine produces, the same way:

* the same log-mel features as faster-whisper's extractor (``mel.log_mel``: the whole batch in
  one STFT on the engine's device), the same prompt (start of
  transcript, language, task, *no timestamps*) and the same suppressed tokens;
* the same rungs of the coverage ladder (``base.Decoding``): with timestamp tokens (the prompt
  without *no timestamps*, OpenAI's timestamp rules as transformers'
  ``WhisperTimeStampLogitsProcessor``), and Whisper's temperature fallback, batched over the rows
  that fail its checks (sampling best of 5, from a fixed seed);
* a looping guard on every decode (``_LoopGuard``): a chunk whose tokens end in four copies of
  one phrase is ended there, so it cannot run its whole batch to the 448-token limit, and is
  cut after the first copy (or, with a fallback, decoded again at the next temperature); and
  every call capped by the token budget of its longest audio (``base.token_budget``), as the
  CTranslate2 engine caps its calls: a loop the guard does not see stops there;
* words timed by cross-attention: one teacher-forced decoder pass over each chunk's text
  records the raw attention scores of the model's alignment heads (hooks on their q/k
  projections, so any attention kernel works), then OpenAI's recipe (softmax over the chunk's
  frames, per-frame normalisation, median filter, DTW over the whole batch at once in
  ``dtw.dtw_batch``) gives a frame per token; grouping
  tokens into words, punctuation merging and duration clamps are faster-whisper's own code
  (``WhisperModel.add_word_timestamps`` run on this engine's alignments);
* the same pass gives each chunk's no-speech probability and average log-probability, and
  Whisper's no-speech rule drops a chunk's text exactly as the CTranslate2 engine does
  (exposed on ``Segment.no_speech_prob`` / ``avg_logprob``);
* cues are cut by ``workers.cues.split_into_cues``.

Weights: a transformers checkpoint directory, or a CTranslate2 model directory (the bundled
``tiny.en`` included), converted once into ``$XDG_CACHE_HOME/vtp/transformers`` by
``ct2_convert`` — so it works offline.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from app import errors
from app.config import default_cache_dir
from app.messages import Chunk, Segment, TranscribeOptions
from workers import cues
from workers.engines.alignment import FRAMES_PER_SECOND, Aligner as _Aligner, alignment_heads as _alignment_heads
from workers.engines.alignment import default_alignment_heads as _default_alignment_heads
from workers.engines.base import FAST, Decoding, needs_fallback, said_nothing, token_budget
from workers.engines.loop_guard import LoopGuard as _LoopGuard, loop_cut
from workers.engines.mel import log_mel
from workers.engines.models import BUNDLED_MODEL_NAME, bundled_model_path
from workers.engines.whisper_common import NO_SPEECH_BEFORE, check_task, one_line, source_word, subsegment

log = logging.getLogger(__name__)

#: Whisper's decoder context (prompt + generated tokens).
MAX_LENGTH = 448
#: Rows per teacher-forced alignment pass: bounds the memory of the hooked keys (rows x layers x
#: 1,500 frames x d_model). A GPU takes 32 (large-v3, fp16: ~1.2 GB); a CPU gains nothing past 8.
ALIGN_ROWS_CPU = 8
ALIGN_ROWS_GPU = 32
#: Whisper's timestamp tokens: 20 ms apart; the first at most 1 s into the window (OpenAI's default).
TIME_PRECISION = 0.02
MAX_INITIAL_TIMESTAMP = 1.0
#: The temperature fallback: samples per row at a temperature above 0 (OpenAI's best_of), from a fixed seed.
SAMPLES = 5
SAMPLING_SEED = 0
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"


def resolve_checkpoint(name: str, cache_dir: Path | None = None) -> Path:
    """A transformers checkpoint directory for ``name``: used as is, or converted from CTranslate2."""
    from workers.engines.ct2_convert import cached_checkpoint

    from workers.engines.models import registry_model_path

    local = registry_model_path(name)  # tiny.en (bundled), base (vtp[multilingual])
    if local is not None:
        source = local
    else:
        source = Path(name).expanduser()
        if not source.is_dir():
            raise errors.ModelNotFound(
                f"{name}: the transformers engine needs a model directory (transformers or CTranslate2) "
                f"or the bundled {BUNDLED_MODEL_NAME}; it downloads nothing"
            )
    if (source / "model.bin").exists():
        return cached_checkpoint(source, cache_dir or Path(default_cache_dir()))
    if (source / "config.json").exists():
        return source
    raise errors.ModelNotFound(f"{name}: directory holds neither a CTranslate2 model.bin nor a transformers config.json")


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise errors.OptionsError("device cuda asked for, but torch sees no CUDA GPU")
    return device


def pick_dtype(compute_type: str, device: str):
    """fp16 (or bf16 when asked) on CUDA; fp32 on CPU, where half precision is slow or missing."""
    import torch

    if device == "cpu":
        return torch.float32
    if "bfloat16" in compute_type:
        return torch.bfloat16
    if compute_type == "float32":
        return torch.float32
    return torch.float16  # float16, int8_float16, int8, auto, default


def pick_attention(device: str, dtype) -> str:
    import torch

    if device == "cuda" and dtype in (torch.float16, torch.bfloat16) and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


class TransformersEngine:
    name = "transformers"
    #: One call at a time: a call already uses the whole device.
    parallel_calls = 1
    #: BENCHMARK-ONLY: generate exactly this many tokens per chunk (random weights never stop on
    #: their own; bench/gpu_throughput.py forces a realistic ~100). None: stop at end of text.
    force_tokens: int | None = None
    #: Sequences (chunks x beams) one model call fitted in after running out of GPU memory; None: no limit seen.
    max_sequences: int | None = None

    def __init__(self, model, tokenizer, model_name: str, device: str, dtype, alignment_heads: list[list[int]]) -> None:
        from faster_whisper.feature_extractor import FeatureExtractor

        self.model = model
        self.hf_tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.model_name = model_name
        self.device = device
        self.dtype = dtype
        self.multilingual = model.config.vocab_size >= 51865
        self.mel_filters = FeatureExtractor(feature_size=model.config.num_mel_bins).mel_filters
        self.alignment_heads = alignment_heads or _default_alignment_heads(model.config)
        self.attention = getattr(model.config, "_attn_implementation", "sdpa")
        # One batch at a time through the model: the hooks below are per call.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, options: TranscribeOptions, *, cache_dir: Path | None = None) -> TransformersEngine:
        try:
            import torch
            from tokenizers import Tokenizer
            from transformers import WhisperForConditionalGeneration
        except ImportError as exc:
            raise errors.OptionsError(
                f"the transformers engine needs torch and transformers (pip install 'vtp[gpu]'): {exc}"
            ) from None
        checkpoint = resolve_checkpoint(options.model, cache_dir)
        device = pick_device(options.device)
        dtype = pick_dtype(options.compute_type, device)
        attention = pick_attention(device, dtype)
        if device == "cpu":
            # Half the cores: torch's OpenMP threads spin while they wait, and on a shared
            # machine that cost 3-15x here (2 cores: tiny.en's encoder 2.0 s with 2 threads,
            # 0.6 s with 1; greedy decoding 13 s vs 0.9 s).
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        try:
            model = WhisperForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype, attn_implementation=attention)
            model.to(device).eval()
            tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
        except Exception as exc:  # corrupt files, CUDA errors: all mean "no usable model"
            raise errors.ModelNotFound(f"cannot load model {options.model!r} with transformers: {one_line(exc)}") from exc
        heads = _alignment_heads(checkpoint)
        log.info("transformers engine: %s on %s, %s, %s attention", options.model, device, dtype, attention)
        return cls(model, tokenizer, options.model, device, dtype, heads)

    # -- the Engine interface ------------------------------------------------------------------

    def transcribe_batch(
        self, audio: list[np.ndarray], chunks: list[Chunk], options: TranscribeOptions, decoding: Decoding = FAST
    ) -> tuple[list[Segment], str]:
        if not audio:
            return [], options.language or "en"
        try:
            with self._lock:
                return self._transcribe_fitting(audio, chunks, options, decoding)
        except errors.VtpError:
            raise
        except (RuntimeError, ValueError, MemoryError) as exc:  # CUDA OOM of one chunk is a RuntimeError: transient
            raise errors.EngineError(f"{self.name} engine failed on a batch of {len(audio)} chunks: {one_line(exc)}") from exc

    def _transcribe_fitting(self, audio, chunks, options, decoding: Decoding = FAST) -> tuple[list[Segment], str]:
        """Decode in model calls that fit the GPU: a call that runs out of memory is halved and
        retried, and the size that fitted (in sequences: chunks x beams) is kept for later calls.
        So ``VTP_DECODE_BATCH`` is a ceiling, not a promise: the default suits an 80 GB card at
        beam 5, and a smaller card settles on what it holds instead of failing every job."""
        import torch

        # sequences per chunk: its beams, or its samples where the fallback may sample
        beams = max(1, options.beam_size, SAMPLES if any(t > 0 for t in decoding.temperatures) else 1)
        segments: list[Segment] = []
        language = ""
        start = 0
        while start < len(audio):
            rows = len(audio) - start
            if self.max_sequences:
                rows = min(rows, max(1, self.max_sequences // beams))
            try:
                found, lang = self._transcribe(audio[start : start + rows], chunks[start : start + rows], options, decoding)
            except torch.cuda.OutOfMemoryError:
                if rows == 1:
                    raise
                torch.cuda.empty_cache()
                self.max_sequences = rows // 2 * beams
                log.warning("%s engine: out of GPU memory at %d chunks x beam %d; decoding %d at a time from now on",
                            self.name, rows, beams, rows // 2)
                continue
            segments.extend(found)
            language = language or lang
            start += rows
        return segments, language

    def _transcribe(self, audio, chunks, options, decoding: Decoding = FAST) -> tuple[list[Segment], str]:
        import torch
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import WhisperModel, get_suppressed_tokens

        with torch.inference_mode():
            inputs = log_mel(audio, self.mel_filters, self.device, self.dtype)
            encoded = self.model.model.encoder(inputs).last_hidden_state
            longest = max(range(len(audio)), key=lambda i: audio[i].size)
            language = self._language(encoded[longest : longest + 1], options)
            check_task(self.multilingual, options.task, self.model_name)
            tokenizer = Tokenizer(self.hf_tokenizer, self.multilingual, task=options.task, language=language)
            # alignment (and the fast decode) use the no-timestamps prompt, as OpenAI's find_alignment does
            text_prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
            decoded = self._decode(encoded, tokenizer, get_suppressed_tokens(tokenizer, [-1]), options, decoding,
                                   seconds=audio[longest].size / 16000, language=language)
            texts = [d.text for d in decoded]
            rows = [i for i, t in enumerate(texts) if t]
            scored = self._score(encoded, rows, [texts[i] for i in rows], text_prompt, tokenizer,
                                 [int(np.ceil(audio[i].size / 16000) * FRAMES_PER_SECOND) for i in rows])
        for i in rows:  # the decode's own figures where it has them (with timestamps, at a temperature)
            if decoded[i].avg_logprob is not None:
                scored[i].avg_logprob, scored[i].no_speech_prob = decoded[i].avg_logprob, decoded[i].no_speech_prob
        spoken = [
            i for i in rows
            # Whisper's own verdict that nothing was said: no hallucinated words in noise.
            if not said_nothing(scored[i].no_speech_prob, scored[i].avg_logprob)
        ]
        subs = [subsegment(texts[i], chunks[i]) for i in spoken]
        if subs:
            # faster-whisper's own word grouping and clamps, on this engine's alignments
            aligner = _Aligner(scored)
            WhisperModel.add_word_timestamps(
                aligner, subs, tokenizer, spoken, [scored[i].num_frames for i in spoken],
                PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS, NO_SPEECH_BEFORE,
            )
        segments: list[Segment] = []
        for i, sub in zip(spoken, (s[0] for s in subs)):
            segments.extend(
                cues.split_into_cues(
                    chunks[i],
                    tokenizer.decode(texts[i]),
                    [source_word(w, chunks[i]) for w in sub.get("words", [])],
                    keep_words=options.word_timestamps,
                    avg_logprob=float(scored[i].avg_logprob),
                    no_speech_prob=float(scored[i].no_speech_prob),
                )
            )
        return segments, language

    def _decode(self, encoded, tokenizer, suppress: tuple[int, ...], options, decoding: Decoding, *,
                seconds: float, language: str | None) -> list[_Decoded]:
        """Every row decoded as ``decoding`` says: with or without timestamp tokens, and Whisper's
        temperature fallback, batched. All rows are decoded at the first temperature; a row that
        fails (it looped, its text compresses above ``COMPRESSION_RATIO_THRESHOLD`` or its average
        log-probability is below ``LOGPROB_THRESHOLD``) and is not judged silence is decoded again,
        with the other failed rows only, at the next temperature; the first that passes, or the
        last, is kept. A kept decode that looped is cut after the first copy of what it repeats.

        Log-probabilities come from one teacher-forced pass over the decoded tokens (timestamps
        included) after the decode's prompt: the model's own distribution, before suppression
        and timestamp rules (OpenAI sums them after). The fast default (no timestamps, one
        temperature) needs none: ``_score`` gives them with the alignment."""
        prompt = list(tokenizer.sot_sequence) if decoding.timestamps else [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        # the call's token budget from its longest audio (``token_budget``, as the CTranslate2 engine
        # caps its calls): a looping row the guard lets through stops there, not at 448 tokens
        budget = token_budget(seconds, language, MAX_LENGTH - len(prompt))
        temperatures = decoding.temperatures or (0.0,)
        scores_needed = decoding.timestamps or temperatures != (0.0,)
        kept: list[_Decoded | None] = [None] * encoded.shape[0]
        pending = list(range(encoded.shape[0]))
        for step, temperature in enumerate(temperatures):
            last = step == len(temperatures) - 1
            candidates = self._generate(encoded[pending], prompt, tokenizer, suppress, options,
                                        temperature=temperature, timestamps=decoding.timestamps, max_new=budget)
            found = [[_Decoded.of(seq, tokenizer, temperature) for seq in row] for row in candidates]
            if scores_needed:
                flat = [(row, d) for row, ds in zip(pending, found) for d in ds]
                for (_row, d), (total, no_speech) in zip(flat, self._sequence_logprobs(
                        encoded, [row for row, _ in flat], prompt, [d.tokens for _, d in flat], tokenizer)):
                    d.sum_logprob, d.no_speech_prob = total, no_speech
                    d.avg_logprob = total / (len(d.tokens) + 1)
            retry = []
            for row, ds in zip(pending, found):
                # best of the samples: OpenAI's ranking (sum of log-probabilities over length)
                best = max(ds, key=lambda d: d.sum_logprob / max(1, len(d.tokens))) if len(ds) > 1 else ds[0]
                if last or not best.failed(tokenizer):
                    kept[row] = best
                else:
                    retry.append(row)
            if retry:
                log.debug("%s engine: %d of %d rows failed at temperature %g", self.name, len(retry), len(pending), temperature)
            pending = retry
            if not pending:
                break
        return kept  # type: ignore[return-value]

    # -- steps -------------------------------------------------------------------------------

    def detect_languages(self, audio: list[np.ndarray]) -> list[tuple[str, float]]:
        """Each chunk's most likely language and its probability (one encoder pass for all)."""
        if not self.multilingual:
            return [("en", 1.0)] * len(audio)
        if not audio:
            return []
        import torch
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        sot = self.hf_tokenizer.token_to_id("<|startoftranscript|>")
        lang_ids = {code: self.hf_tokenizer.token_to_id(f"<|{code}|>") for code in _LANGUAGE_CODES}
        codes = [c for c, i in lang_ids.items() if i is not None]
        try:
            with self._lock, torch.inference_mode():
                encoded = self.model.model.encoder(log_mel(audio, self.mel_filters, self.device, self.dtype)).last_hidden_state
                ids = torch.full((len(audio), 1), sot, device=self.device)
                logits = self.model(encoder_outputs=(encoded,), decoder_input_ids=ids, use_cache=False).logits[:, -1]
                probs = logits[:, [lang_ids[c] for c in codes]].float().softmax(-1).cpu().numpy()
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise errors.EngineError(f"{self.name} engine failed detecting the language of {len(audio)} chunks: {one_line(exc)}") from exc
        return [(codes[int(p.argmax())], float(p.max())) for p in probs]

    def _language(self, encoded, options: TranscribeOptions) -> str:
        if not self.multilingual:
            return "en"
        if options.language:
            return options.language
        import torch

        # One guess per batch from its longest chunk, as the CTranslate2 engine does.
        sot = self.hf_tokenizer.token_to_id("<|startoftranscript|>")
        ids = torch.tensor([[sot]], device=self.device)
        logits = self.model(encoder_outputs=(encoded,), decoder_input_ids=ids, use_cache=False).logits[0, -1]
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        lang_ids = {code: self.hf_tokenizer.token_to_id(f"<|{code}|>") for code in _LANGUAGE_CODES}
        lang_ids = {c: i for c, i in lang_ids.items() if i is not None and i < logits.shape[-1]}
        return max(lang_ids, key=lambda c: float(logits[lang_ids[c]]))

    def _generate(self, encoded, prompt: list[int], tokenizer, suppress: tuple[int, ...], options, *,
                  max_new: int, temperature: float = 0.0, timestamps: bool = False) -> list[list[list[int]]]:
        """One batched ``generate``: beam search (greedy at beam 1) at temperature 0, else
        ``SAMPLES`` samples per row; with Whisper's timestamp rules when ``timestamps``. Every
        decode runs the looping guard. The new tokens of each row's candidates, end of text cut off."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList
        from transformers.generation.logits_process import WhisperTimeStampLogitsProcessor
        from transformers.generation.utils import GenerationMixin
        from transformers.modeling_outputs import BaseModelOutput

        sampling = temperature > 0
        samples = SAMPLES if sampling else 1
        config = GenerationConfig(
            decoder_start_token_id=prompt[0],
            eos_token_id=tokenizer.eot,
            pad_token_id=tokenizer.eot,
            num_beams=1 if sampling else options.beam_size,
            do_sample=sampling,
            num_return_sequences=samples,
            length_penalty=1.0,
            max_new_tokens=self.force_tokens or max_new,
            min_new_tokens=self.force_tokens or 0,
            suppress_tokens=list(suppress),
            # suppress_blank: no blank and no end of text as the first token
            begin_suppress_tokens=[*tokenizer.encode(" "), tokenizer.eot],
            use_cache=True,
            # sampling from the whole distribution, as Whisper does: no top-k, no top-p
            **({"temperature": temperature, "top_k": 0, "top_p": 1.0} if sampling else {}),
        )
        processors = LogitsProcessorList()
        if timestamps:
            # OpenAI's ApplyTimestampRules: a timestamp first (at most MAX_INITIAL_TIMESTAMP), then
            # in pairs, never decreasing; a timestamp whenever their mass beats any text token
            rules = SimpleNamespace(
                no_timestamps_token_id=tokenizer.no_timestamps, eos_token_id=tokenizer.eot, bos_token_id=None,
                max_initial_timestamp_index=round(MAX_INITIAL_TIMESTAMP / TIME_PRECISION),
            )
            processors.append(WhisperTimeStampLogitsProcessor(rules, begin_index=len(prompt)))
        if not self.force_tokens:
            processors.append(_LoopGuard(len(prompt), tokenizer.eot, tokenizer.timestamp_begin))
        ids = torch.tensor([prompt] * encoded.shape[0], device=self.device)
        cache = _beam_cache() if config.num_beams > 1 else None
        extra = {"cache": cache} if cache is not None else {}
        with _seeded(self.device, sampling):
            # GenerationMixin.generate, not Whisper's override: the prompt and options are ours.
            out = GenerationMixin.generate(
                self.model, encoder_outputs=BaseModelOutput(last_hidden_state=encoded), decoder_input_ids=ids,
                attention_mask=torch.ones(encoded.shape[:2], dtype=torch.long, device=self.device),
                generation_config=config, logits_processor=processors, **extra,
            )
        seqs = [_until_eot(row[len(prompt):].tolist(), tokenizer.eot) for row in out]
        return [seqs[i * samples : (i + 1) * samples] for i in range(encoded.shape[0])]

    def _sequence_logprobs(self, encoded, rows: list[int], prompt: list[int], seqs: list[list[int]],
                           tokenizer) -> list[tuple[float, float]]:
        """Teacher-forced over ``prompt + seq + eot`` for each (row, seq): the sum of the
        log-probabilities of ``seq + eot`` and the no-speech probability."""
        import torch

        decoder = self.model.model.decoder
        step = ALIGN_ROWS_CPU if self.device == "cpu" else ALIGN_ROWS_GPU
        results: list[tuple[float, float]] = []
        for start in range(0, len(seqs), step):
            part = [prompt + seq + [tokenizer.eot] for seq in seqs[start : start + step]]
            width = max(map(len, part))
            ids = torch.tensor([s + [tokenizer.eot] * (width - len(s)) for s in part], device=self.device)
            hidden = decoder(input_ids=ids, encoder_hidden_states=encoded[rows[start : start + step]],
                             use_cache=False).last_hidden_state
            for k, seq in enumerate(part):
                logprobs = torch.log_softmax(self.model.proj_out(hidden[k, : len(seq) - 1]).float(), dim=-1)
                targets = torch.tensor(seq[len(prompt):], device=self.device)
                total = float(logprobs[len(prompt) - 1 :].gather(1, targets[:, None]).sum())
                results.append((total, float(logprobs[0, tokenizer.no_speech].exp())))
        return results

    def _score(self, encoded, rows: list[int], texts: list[list[int]], prompt: list[int], tokenizer,
               num_frames: list[int]) -> dict[int, SimpleNamespace]:
        """One teacher-forced decoder pass over ``prompt + text + eot`` per row: the no-speech
        probability, the average log-probability, each text token's probability, and the raw
        cross-attention scores of the alignment heads (for DTW)."""
        import torch

        decoder = self.model.model.decoder
        layers = sorted({layer for layer, _ in self.alignment_heads})
        head_dim = self.model.config.d_model // self.model.config.decoder_attention_heads
        captured: dict[tuple[int, str], torch.Tensor] = {}
        hooks = []
        for layer in layers:
            attn = decoder.layers[layer].encoder_attn
            for proj in ("q_proj", "k_proj"):
                hooks.append(getattr(attn, proj).register_forward_hook(
                    lambda _m, _i, out, key=(layer, proj): captured.__setitem__(key, out)
                ))
        results: dict[int, SimpleNamespace] = {}
        step = ALIGN_ROWS_CPU if self.device == "cpu" else ALIGN_ROWS_GPU
        try:
            for start in range(0, len(rows), step):
                part = rows[start : start + step]
                seqs = [prompt + texts[start + k] + [tokenizer.eot] for k in range(len(part))]
                width = max(map(len, seqs))
                ids = torch.tensor([s + [tokenizer.eot] * (width - len(s)) for s in seqs], device=self.device)
                hidden = decoder(input_ids=ids, encoder_hidden_states=encoded[part], use_cache=False).last_hidden_state
                for k, row in enumerate(part):
                    text = texts[start + k]
                    n = len(text)
                    logits = self.model.proj_out(hidden[k, : len(prompt) + n]).float()
                    logprobs = torch.log_softmax(logits, dim=-1)
                    # OpenAI's rule: no-speech at the start-of-transcript position
                    no_speech = float(logprobs[0, tokenizer.no_speech].exp())
                    targets = torch.tensor(text + [tokenizer.eot], device=self.device)
                    token_lp = logprobs[len(prompt) - 1 :].gather(1, targets[:, None])[:, 0]
                    text_probs = torch.softmax(logits[len(prompt) - 1 : len(prompt) - 1 + n, : tokenizer.eot], dim=-1)
                    text_probs = text_probs.gather(1, targets[:n, None])[:, 0]
                    # rows: the no-timestamps position (predicting the first word) .. the last text token
                    qk = torch.stack([
                        captured[(layer, "q_proj")][k, len(prompt) - 1 : len(prompt) + n, h * head_dim : (h + 1) * head_dim].float()
                        @ captured[(layer, "k_proj")][k, : num_frames[start + k] // 2, h * head_dim : (h + 1) * head_dim].float().T
                        for layer, h in self.alignment_heads
                    ]) * head_dim**-0.5
                    results[row] = SimpleNamespace(
                        no_speech_prob=no_speech,
                        avg_logprob=float(token_lp.sum()) / (n + 1),
                        text_token_probs=text_probs.cpu().numpy(),
                        qk=qk,
                        num_frames=num_frames[start + k],
                    )
                captured.clear()
        finally:
            for hook in hooks:
                hook.remove()
        return results


def _until_eot(tokens: list[int], eot: int) -> list[int]:
    return tokens[: tokens.index(eot)] if eot in tokens else tokens


class _Decoded:
    """One decode of one row: its tokens (timestamps included), the text tokens kept (timestamps
    dropped, a loop cut after its first copy), and, where computed, its log-probabilities."""

    def __init__(self, tokens: list[int], text: list[int], looped: bool, temperature: float) -> None:
        self.tokens = tokens
        self.text = text
        self.looped = looped
        self.temperature = temperature
        self.sum_logprob = 0.0
        self.avg_logprob: float | None = None
        self.no_speech_prob: float | None = None

    @classmethod
    def of(cls, tokens: list[int], tokenizer, temperature: float) -> _Decoded:
        cut = loop_cut(tokens, tokenizer.timestamp_begin)
        text = [t for t in (tokens if cut is None else tokens[:cut]) if t < tokenizer.eot]
        return cls(tokens, text, cut is not None, temperature)

    def failed(self, tokenizer) -> bool:
        """Whisper's fallback test: looping or unsure, unless it judges the row silence."""
        assert self.avg_logprob is not None and self.no_speech_prob is not None
        text = tokenizer.decode([t for t in self.tokens if t < tokenizer.eot])
        if self.looped:
            return not said_nothing(self.no_speech_prob, self.avg_logprob)
        return needs_fallback(text, self.avg_logprob, self.no_speech_prob)


@contextmanager
def _seeded(device: str, sampling: bool):
    """Sampling from a fixed seed, the caller's random state untouched: the same audio gives the
    same transcript on every run (a retried job, a test)."""
    import torch

    if not sampling:
        yield
        return
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.startswith("cuda") else []):
        torch.manual_seed(SAMPLING_SEED)
        yield


def _beam_cache():
    """transformers' encoder-decoder cache, except that beam search leaves the cross-attention
    keys/values where they are: every beam of one chunk has the same ones, so reordering them
    (transformers copies all of them at every step) changes nothing. Measured on tiny.en on
    CPU, beam 5, 3 chunks of jfk.flac: 15.2 s with transformers' cache, 7.1 s with this one;
    on a GPU it saves copying (batch x beams x layers x 1500 frames) keys and values per token."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    class BeamCache(EncoderDecoderCache):
        def reorder_cache(self, beam_idx) -> None:
            self.self_attention_cache.reorder_cache(beam_idx)

    return BeamCache(DynamicCache(), DynamicCache())
