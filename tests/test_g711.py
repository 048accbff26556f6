"""G.711 mu-law / A-law in voice_agent.audio: known code points of the ITU / Sun reference coder, round trips."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from voice_agent.audio import (
    ALAW_TO_PCM16,
    PCM16_SCALE,
    ULAW_TO_PCM16,
    alaw_to_float,
    float_to_alaw,
    float_to_ulaw,
    ulaw_to_float,
)

ALL_INT16 = np.arange(-32768, 32768)  # every int16 value


def ints(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.float64) / PCM16_SCALE


# (code, linear value) from the reference decoder's tables
ULAW_DECODE = [(0x00, -32124), (0x7F, 0), (0x80, 32124), (0xFF, 0), (0xCE, 988), (0x4E, -988), (0xFE, 8),
               (0xF0, 120), (0xEF, 132), (0x8F, 16764)]
ALAW_DECODE = [(0xD5, 8), (0x55, -8), (0xAA, 32256), (0x2A, -32256), (0xD4, 24), (0xC5, 264), (0x80, 5504),
               (0xA5, 16896), (0xE1, 1312)]
# (linear value, code) from the reference encoder
ULAW_ENCODE = [(0, 0xFF), (-1, 0x7E), (1000, 0xCE), (-1000, 0x4E), (32767, 0x80), (-32768, 0x00), (8, 0xFE),
               (32124, 0x80)]
ALAW_ENCODE = [(0, 0xD5), (-1, 0x55), (8, 0xD5), (16, 0xD4), (32767, 0xAA), (-32768, 0x2A), (1312, 0xE1)]


@pytest.mark.parametrize(("code", "value"), ULAW_DECODE)
def test_ulaw_decodes_known_code_points(code: int, value: int) -> None:
    assert ULAW_TO_PCM16[code] == value
    assert ulaw_to_float(bytes([code]))[0] == np.float32(value / PCM16_SCALE)


@pytest.mark.parametrize(("code", "value"), ALAW_DECODE)
def test_alaw_decodes_known_code_points(code: int, value: int) -> None:
    assert ALAW_TO_PCM16[code] == value
    assert alaw_to_float(bytes([code]))[0] == np.float32(value / PCM16_SCALE)


@pytest.mark.parametrize(("value", "code"), ULAW_ENCODE)
def test_ulaw_encodes_known_values(value: int, code: int) -> None:
    assert float_to_ulaw(ints([value])) == bytes([code])


@pytest.mark.parametrize(("value", "code"), ALAW_ENCODE)
def test_alaw_encodes_known_values(value: int, code: int) -> None:
    assert float_to_alaw(ints([value])) == bytes([code])


def test_every_code_survives_a_round_trip() -> None:
    codes = np.arange(256, dtype=np.uint8)
    ulaw = np.frombuffer(float_to_ulaw(ulaw_to_float(codes)), dtype=np.uint8)
    alaw = np.frombuffer(float_to_alaw(alaw_to_float(codes)), dtype=np.uint8)
    assert np.array_equal(alaw, codes)
    same = ulaw == codes
    assert same.sum() == 255 and not same[0x7F] and ulaw[0x7F] == 0xFF  # mu-law's "negative zero" becomes +0


@pytest.mark.parametrize(("encode", "table", "max_error"), [(float_to_ulaw, ULAW_TO_PCM16, 1024),
                                                            (float_to_alaw, ALAW_TO_PCM16, 1024)])
def test_quantization_is_monotonic_and_relative_error_bounded(
    encode: Callable[[np.ndarray], bytes], table: np.ndarray, max_error: int
) -> None:
    decoded = table[np.frombuffer(encode(ALL_INT16 / PCM16_SCALE), dtype=np.uint8)].astype(np.int64)
    assert np.all(np.diff(decoded) >= 0)
    err = np.abs(decoded - ALL_INT16)
    assert err.max() <= max_error
    loud = np.abs(ALL_INT16) > 1024
    assert (err[loud] / np.abs(ALL_INT16[loud])).max() < 0.07  # ~4 bits of mantissa per segment (clip aside)


def test_float_input_is_clipped_and_empty_input_is_empty() -> None:
    assert float_to_ulaw(np.array([2.0, -2.0])) == bytes([0x80, 0x00])
    assert float_to_alaw(np.array([2.0, -2.0])) == bytes([0xAA, 0x2A])
    assert float_to_ulaw(np.zeros(0)) == b"" and len(ulaw_to_float(b"")) == 0


def test_decoders_refuse_a_wide_array() -> None:
    with pytest.raises(ValueError, match="expected a uint8 array of G.711 codes, got dtype int16"):
        ulaw_to_float(np.zeros(3, dtype=np.int16))


def test_a_sine_survives_both_codecs() -> None:
    t = np.arange(8000) / 8000
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for encode, decode in ((float_to_ulaw, ulaw_to_float), (float_to_alaw, alaw_to_float)):
        y = decode(encode(x))
        snr = 10 * np.log10(np.sum(x**2) / np.sum((x - y) ** 2))
        assert y.dtype == np.float32 and snr > 30, snr


def test_every_int16_matches_audioop_where_it_still_exists() -> None:
    audioop = pytest.importorskip("audioop")  # removed in Python 3.13; the tables above stand in for it there
    pcm = ALL_INT16.astype("<i2")
    assert float_to_ulaw(pcm / PCM16_SCALE) == audioop.lin2ulaw(pcm.tobytes(), 2)
    assert float_to_alaw(pcm / PCM16_SCALE) == audioop.lin2alaw(pcm.tobytes(), 2)
    codes = bytes(range(256))
    assert np.array_equal(np.frombuffer(audioop.ulaw2lin(codes, 2), "<i2"), ULAW_TO_PCM16)
    assert np.array_equal(np.frombuffer(audioop.alaw2lin(codes, 2), "<i2"), ALAW_TO_PCM16)
