"""Whisper's log-mel features for a whole batch at once, in torch on the engine's device.

The same numbers as faster-whisper's ``FeatureExtractor`` followed by ``[..., :-1]`` and
``pad_or_trim`` (what the CTranslate2 engine feeds its encoder), computed for every chunk of a
batch in one STFT. faster-whisper's extractor is numpy on one chunk at a time: ~30 ms per 30 s
chunk on a CPU core, so 2 s of a 64-chunk GPU batch; here it is one kernel sequence on the GPU.

Why one padded batch gives each chunk's own features: a chunk of ``n`` samples keeps the
frames ``f < (n + 160) // 160 - 1``, whose STFT windows end inside the chunk's own 160 zero
samples (faster-whisper pads each chunk with them), so padding every chunk to the longest with
zeros changes none of them; the per-chunk maximum (Whisper's 80 dB floor) is taken over the
frames faster-whisper takes it over, ``f < (n + 160) // 160``, and the rest is zero, as
``pad_or_trim`` makes it.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
#: Encoder input: 30 s of frames.
N_FRAMES = 3000


def log_mel(audio: list[np.ndarray], mel_filters, device: str, dtype):
    """(batch, n_mels, 3000) log-mel features of 16 kHz mono chunks (at most 30 s each)."""
    import torch

    lengths = [min(int(a.size), N_FRAMES * HOP) for a in audio]
    width = max(lengths) + HOP
    host = torch.zeros(len(audio), width, dtype=torch.float32)
    for row, (a, n) in enumerate(zip(audio, lengths)):
        host[row, :n] = torch.from_numpy(np.ascontiguousarray(a[:n], dtype=np.float32))
    waves = host.to(device, non_blocking=True)
    window = torch.hann_window(N_FFT, periodic=True, device=device)  # = np.hanning(401)[:-1]
    spectrum = torch.stft(waves, N_FFT, HOP, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = spectrum.abs().square()
    filters = torch.as_tensor(mel_filters, dtype=torch.float32, device=device)
    logs = torch.clamp(filters @ power, min=1e-10).log10()  # (batch, n_mels, frames)

    frames = torch.arange(logs.shape[-1], device=device)
    counted = torch.tensor([(n + HOP) // HOP for n in lengths], device=device)
    peak = logs.masked_fill(~(frames[None, :] < counted[:, None])[:, None, :], float("-inf")).amax(dim=(1, 2))
    logs = (torch.maximum(logs, (peak - 8.0)[:, None, None]) + 4.0) / 4.0
    kept = (frames[None, :] < (counted - 1)[:, None])[:, None, :]
    logs = torch.where(kept, logs, torch.zeros((), device=device))
    out = torch.zeros(len(audio), logs.shape[1], N_FRAMES, dtype=torch.float32, device=device)
    n = min(N_FRAMES, logs.shape[-1])
    out[..., :n] = logs[..., :n]
    return out.to(dtype)
