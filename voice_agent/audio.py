"""Audio at the edges of the model: reading files, changing sample rates, PCM16 conversions.

Contract:

- `load_audio(path)` reads a WAV/FLAC (anything libsndfile reads) at any rate and channel count and returns
  mono float32 at `INPUT_SAMPLE_RATE`, channels averaged, resampled here in numpy (no ffmpeg). Every
  failure is an `AudioInputError` naming the file: unreadable, empty, or longer than `max_seconds`.
- `Resampler` is a streaming band-limited resampler (windowed-sinc, Kaiser window, polyphase); feeding it
  chunk by chunk gives the same samples as `resample` on the whole signal. `resample` is the one-shot form.
- `pcm16_to_float` / `float_to_pcm16` convert little-endian int16 PCM to float32 in [-1, 1) and back.
- `pcm16be_to_float` / `float_to_pcm16be`: the same in network byte order (RTP's L16, RFC 3551).
- `ulaw_to_float` / `float_to_ulaw` and `alaw_to_float` / `float_to_alaw`: ITU-T G.711 mu-law and A-law (one
  byte per sample, the 8 kHz telephony codecs), vectorized in numpy with the segment rules of the ITU /
  Sun reference coder (the same code points as Python's retired `audioop`).

Deviation from the reference: openai-whisper decodes and resamples with ffmpeg (to int16 at 16 kHz, then
/32768). Here decoding is libsndfile and resampling is our own filter, so the samples differ from the
reference's by the two resamplers' differences (both are near-transparent below 7 kHz); files already at
16 kHz PCM16 give exactly the reference's samples.
"""

from __future__ import annotations

from functools import lru_cache
from math import ceil, gcd
from pathlib import Path

import numpy as np
import soundfile as sf

from voice_agent.errors import AudioInputError

# ---- physics (every rate, frame and PCM constant of the package; nothing else defines one) -------------
INPUT_SAMPLE_RATE = 16_000  # Hz: what the Whisper encoder (and the VAD) hears
OUTPUT_SAMPLE_RATE = 24_000  # Hz: what the HiFT vocoder writes
INPUT_SAMPLES_PER_MS = INPUT_SAMPLE_RATE // 1000  # 16
OUTPUT_SAMPLES_PER_MS = OUTPUT_SAMPLE_RATE // 1000  # 24
MAX_INPUT_SECONDS = 30  # Whisper's window: the longest user turn the encoder takes
MAX_INPUT_SAMPLES = MAX_INPUT_SECONDS * INPUT_SAMPLE_RATE  # 480000
MAX_TURN_MS = MAX_INPUT_SECONDS * 1000  # a user turn is cut (ended as max_length) here
MEL_FRAME_RATE_HZ = 50  # CosyVoice2 flow mel frames per second (HiFT input)
SAMPLES_PER_MEL_FRAME = OUTPUT_SAMPLE_RATE // MEL_FRAME_RATE_HZ  # 480
MEL_FRAMES_PER_UNIT = 2  # CosyVoice2 speech units run at 25 Hz, two mel frames each
UNIT_RATE_HZ = MEL_FRAME_RATE_HZ // MEL_FRAMES_PER_UNIT  # 25 units per second
UNIT_MS = 1000 // UNIT_RATE_HZ  # 40 ms of reply audio per speech unit
SAMPLES_PER_UNIT = OUTPUT_SAMPLE_RATE // UNIT_RATE_HZ  # 960
PCM16_BYTES = 2  # bytes per int16 sample
PCM16_SCALE = 32768.0  # int16 full scale: float = int16 / PCM16_SCALE
PCM16_MAX = int(PCM16_SCALE) - 1  # 32767
PCM16_MIN = -int(PCM16_SCALE)  # -32768
G711_SAMPLE_RATE = 8_000  # Hz: G.711 mu-law / A-law telephony audio, one byte per sample

# ---- resampling filter ----------------------------------------------------------------------------------
# A Kaiser-windowed sinc low-pass at the lower of the two Nyquist frequencies. With these values the
# stopband starts at about the lower Nyquist frequency and is ~90 dB down; the passband is flat to ~0.8 of
# the lower Nyquist (6.5 kHz when going to 16 kHz).
RESAMPLE_ZERO_CROSSINGS = 32  # half-width of the sinc, in zero crossings (at the lower rate)
RESAMPLE_ROLLOFF = 0.91  # cutoff as a fraction of the lower Nyquist frequency
RESAMPLE_KAISER_BETA = 9.0  # Kaiser window shape: ~90 dB stopband attenuation


# ---- files ----------------------------------------------------------------------------------------------
def load_audio(
    path: str | Path, *, rate: int = INPUT_SAMPLE_RATE, max_seconds: float | None = None
) -> np.ndarray:
    """Read an audio file as mono float32 at `rate` Hz: shape (N,). Errors as `read_audio`'s."""
    mono, file_rate = read_audio(path, max_seconds=max_seconds)
    return resample(mono, file_rate, rate)


def read_audio(path: str | Path, *, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Read an audio file as mono float32 at its own rate: ((N,) samples, rate in Hz), channels averaged.

    Raises AudioInputError naming the file if it is missing, not audio, empty, or longer than `max_seconds`
    (checked from the header before decoding the samples).
    """
    path = Path(path)
    if not path.is_file():
        raise AudioInputError(f"missing audio file {path}")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioInputError(f"unreadable audio file {path}: expected WAV/FLAC/OGG audio ({e})") from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioInputError(f"empty audio file {path}: expected at least one sample, got {info.frames}")
    seconds = info.frames / info.samplerate
    if max_seconds is not None and seconds > max_seconds:
        raise AudioInputError(
            f"audio file {path} is too long: expected at most {max_seconds:g} s, got {seconds:.2f} s"
        )
    try:
        data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)  # (N, C)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioInputError(f"unreadable audio file {path}: cannot decode samples ({e})") from e
    if data.shape[0] == 0:
        raise AudioInputError(f"empty audio file {path}: expected at least one sample, got 0")
    return data.mean(axis=1, dtype=np.float32), int(file_rate)  # (N,)


# ---- PCM16 ------------------------------------------------------------------------------------------------
def pcm16_to_float(pcm: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Little-endian int16 PCM (bytes, or an int16 array) -> float32 samples in [-1, 1)."""
    if isinstance(pcm, np.ndarray):
        if pcm.dtype.kind != "i" or pcm.dtype.itemsize != PCM16_BYTES:
            raise ValueError(f"expected an int16 array, got dtype {pcm.dtype}")
        ints = pcm
    else:
        raw = bytes(pcm)
        if len(raw) % PCM16_BYTES:
            raise ValueError(f"expected an even number of PCM16 bytes, got {len(raw)}")
        ints = np.frombuffer(raw, dtype="<i2")
    return ints.astype(np.float32) / np.float32(PCM16_SCALE)


def float_to_pcm16(x: np.ndarray) -> bytes:
    """Float samples (nominally [-1, 1]) -> little-endian int16 PCM bytes, rounded and clipped."""
    scaled = np.rint(np.asarray(x, dtype=np.float64) * PCM16_SCALE)
    return np.clip(scaled, PCM16_MIN, PCM16_MAX).astype("<i2").tobytes()


# ---- resampling -------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _polyphase_table(up: int, down: int) -> tuple[np.ndarray, int]:
    """Filter taps for each of the `up` output phases: (up, 2K) float32, and K.

    Output sample n sits at input time t = n * down / up; with base = floor(t) and phase p = (n * down) % up
    it is sum_j x[base + j] * table[p, j + K - 1] for j in [-(K - 1), K].
    """
    cutoff = 0.5 * RESAMPLE_ROLLOFF * min(1.0, up / down)  # cycles per input sample
    half_width = RESAMPLE_ZERO_CROSSINGS / (2.0 * cutoff)  # input samples on each side
    k = int(ceil(half_width))
    offsets = np.arange(-(k - 1), k + 1, dtype=np.float64)  # (2K,)
    frac = np.arange(up, dtype=np.float64)[:, None] / up  # (up, 1)
    t = frac - offsets[None, :]  # (up, 2K): distance from output time to each tap, in input samples
    radius = np.sqrt(np.clip(1 - (t / half_width) ** 2, 0, 1))  # 1 at the centre, 0 at the edges
    window = np.where(np.abs(t) < half_width, np.i0(RESAMPLE_KAISER_BETA * radius), 0.0)
    taps = 2 * cutoff * np.sinc(2 * cutoff * t) * window / np.i0(RESAMPLE_KAISER_BETA)
    taps /= taps.sum(axis=1, keepdims=True)  # exact unit gain at DC for every phase
    return taps.astype(np.float32), k


class Resampler:
    """Streaming band-limited resampler for one mono signal, `src_rate` Hz -> `dst_rate` Hz.

    `process(chunk)` returns every output sample that the input so far determines; `flush()` ends the
    stream (the signal is taken to be zero after its end) and returns the rest. The concatenated outputs
    are the same, up to float rounding, as `resample` on the whole input, whatever the chunking; the total
    length is ceil(N * dst_rate / src_rate). Latency: about RESAMPLE_ZERO_CROSSINGS samples at the lower
    rate (2 ms going to 16 kHz).
    """

    def __init__(self, src_rate: int, dst_rate: int):
        if int(src_rate) != src_rate or int(dst_rate) != dst_rate or src_rate <= 0 or dst_rate <= 0:
            raise ValueError(f"expected positive integer sample rates, got {src_rate} -> {dst_rate}")
        g = gcd(int(src_rate), int(dst_rate))
        self.src_rate, self.dst_rate = int(src_rate), int(dst_rate)
        self.up, self.down = self.dst_rate // g, self.src_rate // g
        self._table, self._k = _polyphase_table(self.up, self.down)
        # Input samples before time 0 are zeros; the buffer starts at absolute index -(K - 1).
        self._buf = np.zeros(self._k - 1, dtype=np.float32)
        self._buf_start = -(self._k - 1)
        self._n_in = 0  # input samples received
        self._n_out = 0  # output samples produced
        self._done = False

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Feed mono samples (N,); returns the output samples now determined (M,) float32."""
        if self._done:
            raise RuntimeError("Resampler.process called after flush")
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 1:
            raise ValueError(f"expected mono samples of shape (N,), got shape {chunk.shape}")
        self._buf = np.concatenate([self._buf, chunk])
        self._n_in += chunk.shape[0]
        # Output n needs inputs up to floor(n * down / up) + K, which must be < n_in.
        n_end = max(self._n_out, -(-(self._n_in - self._k) * self.up // self.down))
        return self._emit(n_end)

    def flush(self) -> np.ndarray:
        """End the stream: returns the remaining output samples (the input is zero after its end)."""
        if self._done:
            return np.zeros(0, dtype=np.float32)
        self._buf = np.concatenate([self._buf, np.zeros(self._k + 1, dtype=np.float32)])
        out = self._emit(-(-self._n_in * self.up // self.down))
        self._done = True
        return out

    def _emit(self, n_end: int) -> np.ndarray:
        n0, count = self._n_out, n_end - self._n_out
        out = np.empty(max(count, 0), dtype=np.float32)
        if count <= 0:
            return out
        width = 2 * self._k
        windows = np.lib.stride_tricks.sliding_window_view(self._buf, width)  # (len - 2K + 1, 2K)
        # Outputs n = r, r + up, r + 2 up, ... share one phase and advance by `down` input samples, so each
        # phase is one matrix-vector product over a strided view.
        for n_first in range(n0, min(n0 + self.up, n_end)):
            t_int, phase = divmod(n_first * self.down, self.up)
            start = t_int - (self._k - 1) - self._buf_start
            rows = windows[start :: self.down][: len(range(n_first, n_end, self.up))]  # (M_r, 2K)
            out[n_first - n0 :: self.up] = rows @ self._table[phase]
        self._n_out = n_end
        # Keep only the inputs later outputs can still need.
        keep_from = (n_end * self.down) // self.up - (self._k - 1)
        drop = keep_from - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start = keep_from
        return out


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample mono samples (N,) from `src_rate` to `dst_rate` Hz -> (ceil(N * dst / src),) float32."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected mono samples of shape (N,), got shape {x.shape}")
    if src_rate == dst_rate:
        return x.copy()
    r = Resampler(src_rate, dst_rate)
    return np.concatenate([r.process(x), r.flush()])


# ---- G.711 (ITU-T G.711; the segment rules of the Sun / ITU reference coder) ---------------------------------
# mu-law codes a 14-bit magnitude (int16 >> 2) plus a bias of 33 in 8 segments; A-law a 13-bit one (int16 >> 3)
# in 8 segments. Codes are stored inverted (mu-law: all bits; A-law: the even bits, XOR 0x55).
ULAW_BIAS = 0x21  # added to the 14-bit magnitude before the segment search
ULAW_CLIP = 8159  # largest 14-bit magnitude mu-law codes (8159 + 33 = 8192 = 2**13)
_ULAW_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def _pcm16_ints(x: np.ndarray) -> np.ndarray:
    """Float samples (nominally [-1, 1]) -> int32 values of int16 range, rounded and clipped (as PCM16)."""
    scaled = np.rint(np.asarray(x, dtype=np.float64) * PCM16_SCALE)
    return np.clip(scaled, PCM16_MIN, PCM16_MAX).astype(np.int32)


def _codes(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array of G.711 codes, got dtype {data.dtype}")
        return data
    return np.frombuffer(bytes(data), dtype=np.uint8)


def _linear_to_ulaw(v: np.ndarray) -> np.ndarray:
    """int16-range int32 values -> mu-law codes (uint8)."""
    v = v >> 2  # (N,) 14-bit, arithmetic shift as the reference coder
    mask = np.where(v < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(v), ULAW_CLIP) + ULAW_BIAS
    seg = np.searchsorted(_ULAW_SEGMENT_ENDS, mag)  # 0..8; 8 (full scale) is beyond the last segment
    code = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | ((mag >> (seg + 1)) & 0xF))
    return (code ^ mask).astype(np.uint8)


def _linear_to_alaw(v: np.ndarray) -> np.ndarray:
    """int16-range int32 values -> A-law codes (uint8)."""
    v = v >> 3  # (N,) 13-bit
    mask = np.where(v >= 0, 0xD5, 0x55)
    mag = np.where(v >= 0, v, -v - 1)
    seg = np.searchsorted(_ALAW_SEGMENT_ENDS, mag)  # 0..8; 8 is beyond the last segment
    quant = np.where(seg < 2, mag >> 1, mag >> np.maximum(seg, 1)) & 0xF
    code = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | quant)
    return (code ^ mask).astype(np.uint8)


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0xF) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)  # (256,)


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0xF) << 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)  # (256,)


ULAW_TO_PCM16 = _ulaw_table()  # (256,) int16: the linear value of each mu-law code
ALAW_TO_PCM16 = _alaw_table()  # (256,) int16: the linear value of each A-law code


def ulaw_to_float(codes: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """G.711 mu-law bytes (or a uint8 array) -> float32 samples in [-1, 1)."""
    return ULAW_TO_PCM16[_codes(codes)].astype(np.float32) / np.float32(PCM16_SCALE)


def alaw_to_float(codes: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """G.711 A-law bytes (or a uint8 array) -> float32 samples in [-1, 1)."""
    return ALAW_TO_PCM16[_codes(codes)].astype(np.float32) / np.float32(PCM16_SCALE)


def float_to_ulaw(x: np.ndarray) -> bytes:
    """Float samples (nominally [-1, 1]) -> G.711 mu-law bytes, one per sample (rounded and clipped as PCM16)."""
    return _linear_to_ulaw(_pcm16_ints(x)).tobytes()


def float_to_alaw(x: np.ndarray) -> bytes:
    """Float samples (nominally [-1, 1]) -> G.711 A-law bytes, one per sample (rounded and clipped as PCM16)."""
    return _linear_to_alaw(_pcm16_ints(x)).tobytes()


# ---- L16 (RFC 3551: 16-bit linear PCM in network byte order, as some carriers send it) ----------------------
def pcm16be_to_float(pcm: bytes | bytearray | memoryview) -> np.ndarray:
    """Big-endian int16 PCM bytes (RTP's L16) -> float32 samples in [-1, 1)."""
    raw = bytes(pcm)
    if len(raw) % PCM16_BYTES:
        raise ValueError(f"expected an even number of PCM16 bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=">i2").astype(np.float32) / np.float32(PCM16_SCALE)


def float_to_pcm16be(x: np.ndarray) -> bytes:
    """Float samples (nominally [-1, 1]) -> big-endian int16 PCM bytes (RTP's L16), rounded and clipped."""
    return _pcm16_ints(x).astype(">i2").tobytes()
