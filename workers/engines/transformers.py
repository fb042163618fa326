"""transformers engine: Whisper as ``WhisperForConditionalGeneration`` (the insanely-fast-whisper
recipe without its CLI): fp16/bf16 on CUDA, SDPA attention (FlashAttention-2 when installed),
one encoder pass and one batched ``generate`` per batch of VAD chunks.

It produces what the CTranslate2 engine produces, the same way:

* the same log-mel features as faster-whisper's extractor (``mel.log_mel``: the whole batch in
  one STFT on the engine's device), the same prompt (start of
  transcript, language, task, *no timestamps*) and the same suppressed tokens;
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
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from app import errors
from app.config import default_cache_dir
from app.messages import Chunk, Segment, TranscribeOptions
from workers import cues
from workers.engines.ctranslate2 import (
    BUNDLED_MODEL_NAME,
    LOGPROB_THRESHOLD,
    NO_SPEECH_BEFORE,
    NO_SPEECH_THRESHOLD,
    _one_line,
    _subsegment,
    _word,
    bundled_model_path,
    check_task,
)
from workers.engines.base import FAST, Decoding
from workers.engines.dtw import dtw_batch
from workers.engines.mel import log_mel

log = logging.getLogger(__name__)

#: Whisper's decoder context (prompt + generated tokens).
MAX_LENGTH = 448
#: Mel frames per second, and encoder positions (DTW time steps) per second.
FRAMES_PER_SECOND = 100
TOKENS_PER_SECOND = 50
MEDIAN_FILTER_WIDTH = 7
#: Rows per teacher-forced alignment pass: bounds the memory of the hooked keys (rows x layers x
#: 1,500 frames x d_model). A GPU takes 32 (large-v3, fp16: ~1.2 GB); a CPU gains nothing past 8.
ALIGN_ROWS_CPU = 8
ALIGN_ROWS_GPU = 32

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
            raise errors.ModelNotFound(f"cannot load model {options.model!r} with transformers: {_one_line(exc)}") from exc
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
                return self._transcribe_fitting(audio, chunks, options)
        except errors.VtpError:
            raise
        except (RuntimeError, ValueError, MemoryError) as exc:  # CUDA OOM of one chunk is a RuntimeError: transient
            raise errors.EngineError(f"{self.name} engine failed on a batch of {len(audio)} chunks: {_one_line(exc)}") from exc

    def _transcribe_fitting(self, audio, chunks, options) -> tuple[list[Segment], str]:
        """Decode in model calls that fit the GPU: a call that runs out of memory is halved and
        retried, and the size that fitted (in sequences: chunks x beams) is kept for later calls.
        So ``VTP_DECODE_BATCH`` is a ceiling, not a promise: the default suits an 80 GB card at
        beam 5, and a smaller card settles on what it holds instead of failing every job."""
        import torch

        beams = max(1, options.beam_size)
        segments: list[Segment] = []
        language = ""
        start = 0
        while start < len(audio):
            rows = len(audio) - start
            if self.max_sequences:
                rows = min(rows, max(1, self.max_sequences // beams))
            try:
                found, lang = self._transcribe(audio[start : start + rows], chunks[start : start + rows], options)
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

    def _transcribe(self, audio, chunks, options) -> tuple[list[Segment], str]:
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
            prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
            tokens = self._generate(encoded, prompt, tokenizer, get_suppressed_tokens(tokenizer, [-1]), options)
            texts = [[t for t in seq if t < tokenizer.eot] for seq in tokens]
            rows = [i for i, t in enumerate(texts) if t]
            scored = self._score(encoded, rows, [texts[i] for i in rows], prompt, tokenizer,
                                 [int(np.ceil(audio[i].size / 16000) * FRAMES_PER_SECOND) for i in rows])
        spoken = [
            i for i in rows
            # Whisper's own verdict that nothing was said: no hallucinated words in noise.
            if not (scored[i].no_speech_prob > NO_SPEECH_THRESHOLD and scored[i].avg_logprob < LOGPROB_THRESHOLD)
        ]
        subs = [_subsegment(texts[i], chunks[i]) for i in spoken]
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
                    [_word(w, chunks[i]) for w in sub.get("words", [])],
                    keep_words=options.word_timestamps,
                    avg_logprob=float(scored[i].avg_logprob),
                    no_speech_prob=float(scored[i].no_speech_prob),
                )
            )
        return segments, language

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
            raise errors.EngineError(f"{self.name} engine failed detecting the language of {len(audio)} chunks: {_one_line(exc)}") from exc
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

    def _generate(self, encoded, prompt: list[int], tokenizer, suppress: tuple[int, ...], options) -> list[list[int]]:
        """Batched beam search (greedy at beam 1) without timestamp tokens: new tokens per row."""
        import torch
        from transformers import GenerationConfig
        from transformers.generation.utils import GenerationMixin
        from transformers.modeling_outputs import BaseModelOutput

        config = GenerationConfig(
            decoder_start_token_id=prompt[0],
            eos_token_id=tokenizer.eot,
            pad_token_id=tokenizer.eot,
            num_beams=options.beam_size,
            do_sample=False,
            length_penalty=1.0,
            max_new_tokens=self.force_tokens or MAX_LENGTH - len(prompt),
            min_new_tokens=self.force_tokens or 0,
            suppress_tokens=list(suppress),
            # suppress_blank: no blank and no end of text as the first token
            begin_suppress_tokens=[*tokenizer.encode(" "), tokenizer.eot],
            use_cache=True,
        )
        ids = torch.tensor([prompt] * encoded.shape[0], device=self.device)
        cache = _beam_cache() if options.beam_size > 1 else None
        extra = {"cache": cache} if cache is not None else {}
        # GenerationMixin.generate, not Whisper's override: the prompt and options are ours.
        out = GenerationMixin.generate(
            self.model, encoder_outputs=BaseModelOutput(last_hidden_state=encoded), decoder_input_ids=ids,
            attention_mask=torch.ones(encoded.shape[:2], dtype=torch.long, device=self.device),
            generation_config=config, **extra,
        )
        return [row[len(prompt):].tolist() for row in out]

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


class _Aligner:
    """Stands in for faster-whisper's ``WhisperModel`` so that its ``add_word_timestamps`` and
    ``find_alignment`` (word grouping, punctuation, duration clamps) run on this engine's
    alignments: ``model.align`` is CTranslate2's ``Whisper.align``, done here in torch + numpy."""

    frames_per_second = FRAMES_PER_SECOND
    tokens_per_second = TOKENS_PER_SECOND

    def __init__(self, scored: dict[int, SimpleNamespace]) -> None:
        from faster_whisper.transcribe import WhisperModel

        self._scored = scored
        self._find_alignment = WhisperModel.find_alignment
        self.model = SimpleNamespace(align=self._align)

    def find_alignment(self, tokenizer, text_tokens, encoder_output, num_frames, median_filter_width=MEDIAN_FILTER_WIDTH):
        return self._find_alignment(self, tokenizer, text_tokens, encoder_output, num_frames, median_filter_width)

    def _align(self, rows, start_sequence, text_tokens, num_frames, median_filter_width=MEDIAN_FILTER_WIDTH):
        paths = dtw_batch([-_alignment_matrix(self._scored[row].qk, median_filter_width) for row in rows])
        return [
            SimpleNamespace(alignments=list(zip(text_idx, time_idx)), text_token_probs=self._scored[row].text_token_probs)
            for row, (text_idx, time_idx) in zip(rows, paths)
        ]


def _alignment_matrix(qk, width: int) -> np.ndarray:
    """OpenAI's ``find_alignment``: softmax over frames, normalise per frame, median filter, mean of heads."""
    import torch
    import torch.nn.functional as F

    weights = qk.softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = (weights - mean) / std
    pad = width // 2
    if weights.shape[-1] > pad:
        weights = F.pad(weights[None], (pad, pad, 0, 0), mode="reflect")[0]
        weights = weights.unfold(-1, width, 1).sort(dim=-1).values[..., pad]
    return weights.mean(dim=0).cpu().numpy().astype(np.float64)


def _alignment_heads(checkpoint: Path) -> list[list[int]]:
    """The checkpoint's alignment heads (generation_config.json, as OpenAI's and converted checkpoints have them)."""
    import json

    path = checkpoint / "generation_config.json"
    heads = json.loads(path.read_text()).get("alignment_heads") if path.exists() else None
    return [[int(layer), int(head)] for layer, head in heads or []]


def _default_alignment_heads(config) -> list[list[int]]:
    """Without the model's own list: every head of the upper half of the decoder (OpenAI's default)."""
    layers, heads = config.decoder_layers, config.decoder_attention_heads
    return [[layer, h] for layer in range(layers // 2, layers) for h in range(heads)]
