"""Speaker voices: the 192-d CAM++ x-vector that conditions the flow (the only voice input it has).

A voice is one of (checked in this order by `load_voice`):

1. a file path: a saved embedding (`.pt` torch tensor, `.npy` array, `.npz` with one array or an
   `embedding` entry; shape [1, 192] or [192], float), or a prompt recording (`.wav`/`.flac`/`.ogg`) turned
   into an embedding through `campplus.onnx`;
2. a name cached beside the weights: `DIR/voices/<name>.npy` (float32 [192]);
3. an entry of `DIR/spk2info.pt` (CosyVoice's speaker table). Assumption, not verified on the official
   file: each entry is a dict holding the x-vector under one of `flow_embedding`, `embedding`, `spk_emb`,
   `llm_embedding` (tried in that order; CosyVoice2 reads `embedding`, later versions `flow_embedding`);
4. a default voice name (`en`, `zh`): computed once from the LLaMA-Omni2 prompt recordings
   (`llama_omni2/inference/prompt_en.wav` / `prompt_zh.wav` in github.com/ictnlp/LLaMA-Omni2), which must be
   copied into DIR (or `prompt_dir`), and cached as `DIR/voices/<name>.npy`.

CAM++ input features follow the reference exactly: audio resampled to 16 kHz (windowed-sinc, Hann window,
width 6, roll-off 0.99), Kaldi fbank (80 bins, 25 ms / 10 ms frames, snip edges, povey window, pre-emphasis
0.97, DC removal, no dither, 512-point FFT power spectrum, Kaldi mel scale 20 Hz..Nyquist, log with a float32
eps floor), then per-utterance mean subtraction. Implemented here in torch (no torchaudio). Recordings are
read by `voice_agent.audio.load_audio` at their own rate and resampled by this module's reference filter.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from voice_agent.audio import INPUT_SAMPLE_RATE, read_audio
from voice_agent.errors import AudioInputError, VoiceError
from voice_agent.model.weights import load_torch_file

FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
WINDOW_SAMPLES = int(INPUT_SAMPLE_RATE * FRAME_LENGTH_MS / 1000)  # 400 (CAM++ hears 16 kHz, as the encoder)
SHIFT_SAMPLES = int(INPUT_SAMPLE_RATE * FRAME_SHIFT_MS / 1000)  # 160
FFT_SIZE = 1 << (WINDOW_SAMPLES - 1).bit_length()  # 512, next power of two
NUM_MEL_BINS = 80
LOW_FREQ_HZ = 20.0
HIGH_FREQ_HZ = INPUT_SAMPLE_RATE / 2  # Nyquist
PREEMPHASIS = 0.97
POVEY_POWER = 0.85
LOG_FLOOR = torch.finfo(torch.float32).eps
EMBEDDING_DIM = 192
RESAMPLE_WIDTH = 6  # zero crossings of the sinc on each side
RESAMPLE_ROLLOFF = 0.99

VOICES_DIR = "voices"
DEFAULT_VOICE = "en"
PROMPT_WAVS = {"en": "prompt_en.wav", "zh": "prompt_zh.wav"}
CAMPPLUS_FILE = "campplus.onnx"
SPK2INFO_FILE = "spk2info.pt"
SPK2INFO_KEYS = ("flow_embedding", "embedding", "spk_emb", "llm_embedding")
EMBEDDING_SUFFIXES = (".pt", ".npy", ".npz")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def kaldi_mel_scale(freq_hz: torch.Tensor) -> torch.Tensor:
    """Kaldi mel scale: 1127 ln(1 + f / 700)."""
    return 1127.0 * torch.log(1.0 + freq_hz / 700.0)


def kaldi_mel_scale_hz(freq_hz: float) -> float:
    """The same scale for one frequency, in float64 (as Kaldi computes the band edges)."""
    return 1127.0 * math.log(1.0 + freq_hz / 700.0)


def kaldi_mel_banks() -> torch.Tensor:
    """Triangular filters on the Kaldi mel scale: (80, FFT_SIZE // 2 + 1), the Nyquist column zero."""
    mel_low, mel_high = kaldi_mel_scale_hz(LOW_FREQ_HZ), kaldi_mel_scale_hz(HIGH_FREQ_HZ)
    delta = (mel_high - mel_low) / (NUM_MEL_BINS + 1)
    b = torch.arange(NUM_MEL_BINS, dtype=torch.float32)[:, None]  # (80, 1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = kaldi_mel_scale(INPUT_SAMPLE_RATE / FFT_SIZE * torch.arange(FFT_SIZE // 2, dtype=torch.float32))[None]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # (80, 256)
    return F.pad(banks, (0, 1))  # (80, 257)


def kaldi_fbank(wav16k: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Kaldi log mel filter bank of mono 16 kHz audio (N,) -> (frames, 80), frames = 1 + (N - 400) // 160."""
    x = torch.as_tensor(wav16k, dtype=torch.float32).reshape(-1)
    if x.numel() < WINDOW_SAMPLES:
        raise AudioInputError(f"expected at least {WINDOW_SAMPLES} samples at 16 kHz for fbank, "
                              f"got {x.numel()}")
    frames = x.unfold(0, WINDOW_SAMPLES, SHIFT_SAMPLES)  # (F, 400), snip_edges: only whole frames
    frames = frames - frames.mean(dim=1, keepdim=True)  # remove DC offset
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # first sample repeats itself
    frames = frames - PREEMPHASIS * previous
    window = torch.hann_window(WINDOW_SAMPLES, periodic=False).pow(POVEY_POWER)
    frames = F.pad(frames * window, (0, FFT_SIZE - WINDOW_SAMPLES))  # (F, 512)
    power = torch.fft.rfft(frames).abs().pow(2)  # (F, 257)
    energies = power @ kaldi_mel_banks().T  # (F, 80)
    return torch.clamp(energies, min=LOG_FLOOR).log()


def campplus_features(wav16k: torch.Tensor | np.ndarray) -> torch.Tensor:
    """fbank with per-utterance mean subtraction (CMN): (frames, 80)."""
    feats = kaldi_fbank(wav16k)
    return feats - feats.mean(dim=0, keepdim=True)


def resample(wav: np.ndarray, rate_hz: int, target_hz: int = INPUT_SAMPLE_RATE) -> np.ndarray:
    """Band-limited windowed-sinc resampling (Hann window), as torchaudio's default `resample`."""
    if rate_hz == target_hz:
        return wav.astype(np.float32)
    g = math.gcd(rate_hz, target_hz)
    orig, new = rate_hz // g, target_hz // g
    base = min(orig, new) * RESAMPLE_ROLLOFF
    width = math.ceil(RESAMPLE_WIDTH * orig / base)
    # float32 throughout, as the reference computes its kernel in the waveform's dtype
    idx = torch.arange(-width, width + orig, dtype=torch.float32)[None] / orig  # (1, K)
    t = (torch.arange(0, -new, -1, dtype=torch.float32)[:, None] / new + idx) * base  # (new, K)
    t = t.clamp(-RESAMPLE_WIDTH, RESAMPLE_WIDTH)
    window = torch.cos(t * math.pi / RESAMPLE_WIDTH / 2) ** 2
    t = t * math.pi
    kernels = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)
    x = torch.as_tensor(wav, dtype=torch.float32).reshape(1, 1, -1)
    n = x.shape[-1]
    x = F.pad(x, (width, width + orig))
    y = F.conv1d(x, kernels[:, None], stride=orig)  # (1, new, blocks)
    y = y.transpose(1, 2).reshape(-1)[: math.ceil(new * n / orig)]
    return y.numpy()


def read_prompt_16k(path: str | Path) -> np.ndarray:
    """A recording (any rate, any channel count) as mono float32 16 kHz: read at its own rate by
    `voice_agent.audio.read_audio` (channels averaged, no int16 rescaling), then resampled here as the
    reference resamples it (not with load_audio's filter)."""
    mono, rate = read_audio(path)
    return resample(mono, rate)


@lru_cache(maxsize=4)
def _campplus_session(onnx_path: str):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(onnx_path, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise VoiceError(f"malformed file {onnx_path}: expected the CAM++ ONNX model ({e})") from e


def campplus_embedding(wav16k: torch.Tensor | np.ndarray, onnx_path: str | Path) -> torch.Tensor:
    """CAM++ speaker embedding of 16 kHz mono audio -> (192,) float32; the first model input gets
    the features [1, frames, 80] (its name is not assumed)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise VoiceError(f"missing file {onnx_path}: expected the CAM++ model {CAMPPLUS_FILE}")
    session = _campplus_session(str(onnx_path.resolve()))
    feats = campplus_features(wav16k)[None].numpy()  # (1, F, 80)
    out = session.run(None, {session.get_inputs()[0].name: feats})[0]
    flat = np.asarray(out, dtype=np.float32).reshape(-1)
    if flat.size != EMBEDDING_DIM:
        raise VoiceError(f"{onnx_path}: expected a {EMBEDDING_DIM}-value output, got shape {np.shape(out)}")
    return torch.from_numpy(flat.copy())


def _as_embedding(value: object, where: str) -> torch.Tensor:
    """Check a [1, 192] or [192] float array/tensor and return it as a (192,) float32 tensor."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise VoiceError(f"{where}: expected a float tensor [1, {EMBEDDING_DIM}] or [{EMBEDDING_DIM}], "
                         f"got {type(value).__name__}")
    if not value.is_floating_point():
        raise VoiceError(f"{where}: expected a float embedding, got dtype {value.dtype}")
    if tuple(value.shape) not in ((EMBEDDING_DIM,), (1, EMBEDDING_DIM)):
        raise VoiceError(f"{where}: expected shape [1, {EMBEDDING_DIM}] or [{EMBEDDING_DIM}], "
                         f"got {list(value.shape)}")
    emb = value.detach().reshape(EMBEDDING_DIM).to(torch.float32).cpu().clone()
    if not torch.isfinite(emb).all():
        raise VoiceError(f"{where}: expected finite values, found NaN or inf")
    return emb


def read_embedding_file(path: str | Path) -> torch.Tensor:
    """Read a saved embedding (.pt tensor, .npy array, .npz with one array or `embedding`) -> (192,)."""
    path = Path(path)
    if not path.is_file():
        raise VoiceError(f"missing file {path}: expected a voice embedding")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        try:
            value = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for foreign files
            raise VoiceError(f"malformed file {path}: expected a torch tensor [1, 192] ({e})") from e
        return _as_embedding(value, str(path))
    if suffix in (".npy", ".npz"):
        try:
            loaded = np.load(str(path), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise VoiceError(f"malformed file {path}: expected a numpy {suffix} embedding ({e})") from e
        if suffix == ".npy":
            return _as_embedding(loaded, str(path))
        with loaded:
            names = list(loaded.files)
            if "embedding" in names:
                return _as_embedding(loaded["embedding"], f"{path}['embedding']")
            if len(names) != 1:
                raise VoiceError(f"{path}: expected one array or an 'embedding' array, found {names}")
            return _as_embedding(loaded[names[0]], f"{path}[{names[0]!r}]")
    raise VoiceError(f"{path}: expected a voice file ending in {EMBEDDING_SUFFIXES + AUDIO_SUFFIXES}, "
                     f"got {suffix or 'no suffix'!r}")


def _spk2info_entry(decoder_dir: Path, name: str) -> torch.Tensor | None:
    path = decoder_dir / SPK2INFO_FILE
    if not path.is_file():
        return None
    table = load_torch_file(path, "a speaker table {name: {'embedding': tensor [1, 192], ...}}")
    if not isinstance(table, dict) or name not in table:
        return None
    entry = table[name]
    if isinstance(entry, dict):
        for key in SPK2INFO_KEYS:
            if key in entry:
                return _as_embedding(entry[key], f"{path}[{name!r}][{key!r}]")
        raise VoiceError(f"{path}[{name!r}]: expected one of the keys {SPK2INFO_KEYS}, found {sorted(entry)}")
    return _as_embedding(entry, f"{path}[{name!r}]")


def available_voices(decoder_dir: str | Path) -> list[str]:
    """Names usable as voices in a decoder directory (cached, spk2info entries, default prompts)."""
    d = Path(decoder_dir)
    names = {p.stem for p in (d / VOICES_DIR).glob("*.npy")} | set(PROMPT_WAVS)
    if (d / SPK2INFO_FILE).is_file():
        table = load_torch_file(d / SPK2INFO_FILE, "a speaker table")
        names |= {str(k) for k in table} if isinstance(table, dict) else set()
    return sorted(names)


def default_voice(decoder_dir: str | Path, name: str = DEFAULT_VOICE,
                  prompt_dir: str | Path | None = None) -> torch.Tensor:
    """A default voice (`en` / `zh`): read from its cache, else computed from its prompt and cached."""
    d = Path(decoder_dir)
    cached = d / VOICES_DIR / f"{name}.npy"
    if cached.is_file():
        return read_embedding_file(cached)
    if name not in PROMPT_WAVS:
        raise VoiceError(f"unknown default voice {name!r}: expected one of {sorted(PROMPT_WAVS)}")
    prompt = Path(prompt_dir or d) / PROMPT_WAVS[name]
    if not prompt.is_file():
        raise VoiceError(
            f"default voice {name!r} is not cached at {cached} and its prompt {prompt} is missing: copy "
            f"llama_omni2/inference/{PROMPT_WAVS[name]} from github.com/ictnlp/LLaMA-Omni2 there, "
            "or pass a voice embedding file or recording"
        )
    emb = campplus_embedding(read_prompt_16k(prompt), d / CAMPPLUS_FILE)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, emb.numpy())
    except OSError:
        pass  # read-only weights directory: recompute next time
    return emb


def load_voice(voice: str | Path | None, decoder_dir: str | Path | None = None,
               prompt_dir: str | Path | None = None) -> torch.Tensor:
    """Resolve a voice (None = the default English voice) to a (192,) float32 speaker embedding."""
    if voice is None:
        voice = DEFAULT_VOICE
    text = str(voice)
    path = Path(text)
    if path.suffix.lower() in AUDIO_SUFFIXES:
        if decoder_dir is None:
            raise VoiceError(f"voice recording {path} needs the decoder directory that holds {CAMPPLUS_FILE}")
        return campplus_embedding(read_prompt_16k(path), Path(decoder_dir) / CAMPPLUS_FILE)
    if path.suffix or not _NAME.match(text):
        return read_embedding_file(path)
    if decoder_dir is None:
        raise VoiceError(f"voice name {text!r} needs a decoder directory; "
                         "expected a path to an embedding file")
    d = Path(decoder_dir)
    cached = d / VOICES_DIR / f"{text}.npy"
    if cached.is_file():
        return read_embedding_file(cached)
    from_table = _spk2info_entry(d, text)
    if from_table is not None:
        return from_table
    if text in PROMPT_WAVS:
        return default_voice(d, text, prompt_dir)
    raise VoiceError(f"unknown voice {text!r} in {d}: expected one of {available_voices(d)} or a voice file")
