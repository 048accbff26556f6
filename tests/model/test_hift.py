"""HiFT vocoder: official key layout, weight-norm folding, loading errors, inference maths, determinism."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from voice_agent.audio import SAMPLES_PER_MEL_FRAME
from voice_agent.errors import CheckpointError
from voice_agent.model.cosy2.hift import Excitation, HiFT, draw_excitation, fold_weight_norm, load_hift
from voice_agent.model.cosy2.hift_config import HiFTConfig
from voice_agent.model.cosy2.tiny import write_tiny_hift

TINY = HiFTConfig.tiny()


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_hift(tmp_path_factory.mktemp("hift") / "hift.pt", TINY, seed=3)


@pytest.fixture(scope="module")
def tiny(tiny_path: Path) -> HiFT:
    return load_hift(tiny_path, TINY)


def test_official_config_gives_480_samples_per_frame_and_roundtrips_yaml() -> None:
    cfg = HiFTConfig()
    assert cfg.samples_per_frame == SAMPLES_PER_MEL_FRAME == 480
    assert HiFTConfig.from_yaml(cfg.yaml_section()) == cfg
    assert HiFTConfig.from_yaml(TINY.yaml_section()) == TINY
    with pytest.raises(ValueError, match="unexpected key 'bogus'"):
        HiFTConfig.from_yaml({**cfg.yaml_section(), "bogus": 1})
    with pytest.raises(ValueError, match="sampling_rate"):
        HiFTConfig(upsample_rates=(8, 8, 3))


def test_official_shapes_and_parameter_count() -> None:
    model = HiFT(HiFTConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "conv_pre.weight": (512, 80, 7),
        "ups.0.weight": (512, 256, 16),
        "ups.1.weight": (256, 128, 11),
        "ups.2.weight": (128, 64, 7),
        "source_downs.0.weight": (256, 18, 30),
        "source_downs.1.weight": (128, 18, 6),
        "source_downs.2.weight": (64, 18, 1),
        "source_resblocks.0.convs1.2.weight": (256, 256, 7),
        "source_resblocks.2.convs2.0.weight": (64, 64, 11),
        "source_resblocks.1.activations1.0.alpha": (128,),
        "resblocks.0.convs1.0.weight": (256, 256, 3),
        "resblocks.8.convs2.2.weight": (64, 64, 11),
        "resblocks.4.activations2.1.alpha": (128,),
        "conv_post.weight": (18, 64, 7),
        "f0_predictor.condnet.0.weight": (512, 80, 3),
        "f0_predictor.condnet.8.bias": (512,),
        "f0_predictor.classifier.weight": (1, 512),
        "m_source.l_linear.weight": (1, 9),
        "m_source.l_linear.bias": (1,),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert not any("condnet.1" in k or "condnet.9" in k for k in shapes)
    # hift.pt stores g (one value per output channel) and v for every weight-normed conv: 20.82 M values.
    plain = sum(p.numel() for p in model.parameters())
    g_values = sum(m.weight.shape[0] for n, m in model.named_modules()
                   if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)) and "source_downs" not in n)
    assert round((plain + g_values) / 1e4) / 100 == 20.82


def test_fold_weight_norm_matches_torch_parametrization() -> None:
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.ConvTranspose1d(6, 4, 5))
    with torch.no_grad():
        conv.parametrizations.weight.original0.uniform_(0.5, 2.0)
    g = conv.parametrizations.weight.original0
    v = conv.parametrizations.weight.original1
    assert g.shape == (6, 1, 1)
    torch.testing.assert_close(fold_weight_norm(g, v), conv.weight, rtol=0, atol=1e-6)


def test_both_spellings_and_generator_prefix_give_identical_outputs(tmp_path: Path) -> None:
    variants = [
        write_tiny_hift(tmp_path / "g.pt", TINY, seed=5, spelling="weight_g"),
        write_tiny_hift(tmp_path / "p.pt", TINY, seed=5, spelling="parametrizations"),
        write_tiny_hift(tmp_path / "gp.pt", TINY, seed=5, spelling="weight_g", prefix="generator."),
    ]
    keys = [set(torch.load(p, weights_only=True)) for p in variants]
    assert "conv_pre.weight_g" in keys[0] and "conv_pre.parametrizations.weight.original1" in keys[1]
    assert "generator.ups.2.weight_v" in keys[2] and "generator.source_downs.0.weight" in keys[2]
    mel = torch.randn(1, 80, 12, generator=torch.Generator().manual_seed(0))
    outs = [load_hift(p, TINY).inference(mel, None, generators(9))[0] for p in variants]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_tiny_file_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = write_tiny_hift(tmp_path / "a" / "hift.pt", TINY, seed=1).read_bytes()
    b = write_tiny_hift(tmp_path / "b" / "x.pt", TINY, seed=1).read_bytes()
    c = write_tiny_hift(tmp_path / "c" / "hift.pt", TINY, seed=2).read_bytes()
    assert a == b and a != c


def test_truncated_garbage_or_mismatched_file_raises_checkpoint_error(tmp_path: Path, tiny_path: Path,
                                                                     ) -> None:
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_path.read_bytes()[:5000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file" * 64)
    for bad in (truncated, garbage, tmp_path / "absent.pt"):
        with pytest.raises(CheckpointError, match=bad.name):
            load_hift(bad, TINY)
    state = torch.load(tiny_path, weights_only=True)
    cases = {
        "missing key": ({k: v for k, v in state.items() if k != "conv_post.bias"}, "conv_post.bias"),
        "unexpected key": ({**state, "extra.weight": torch.zeros(1)}, "extra.weight"),
        "no v": ({k: v for k, v in state.items() if k != "conv_pre.weight_v"}, "conv_pre.weight_g"),
        "no g": ({k: v for k, v in state.items() if k != "ups.1.weight_g"}, "ups.1.weight_v"),
        "not a dict": ([1, 2, 3], "state dict"),
    }
    for name, (content, needle) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save(content, path)
        with pytest.raises(CheckpointError, match=needle):
            load_hift(path, TINY)
    official_vs_tiny = r"shape mismatch .*hift.pt.* expected \(512, 80, 3\), found \(32"
    with pytest.raises(CheckpointError, match=official_vs_tiny):
        load_hift(tiny_path, HiFTConfig())


def test_inference_shapes_limit_and_cache_source_overwrite(tiny: HiFT) -> None:
    mel = torch.randn(2, 80, 10, generator=torch.Generator().manual_seed(1))
    speech, source = tiny.inference(mel, None, generators(1, 2))
    assert speech.shape == (2, 480 * 10) and source.shape == (2, 1, 480 * 10)
    assert speech.abs().max() <= TINY.audio_limit and torch.isfinite(speech).all()
    cache = torch.full((2, 1, 3840), 0.25)
    speech_c, source_c = tiny.inference(mel, cache, generators(1, 2))
    assert torch.equal(source_c[:, :, :3840], cache)
    assert torch.equal(source_c[:, :, 3840:], source[:, :, 3840:])  # same draws, only the start replaced
    assert not torch.equal(speech_c, speech)
    with pytest.raises(ValueError, match="expected mel"):
        tiny.inference(torch.zeros(2, 81, 10))
    with pytest.raises(ValueError, match="expected 2 generators"):
        tiny.inference(mel, None, generators(1))


def test_excitation_is_deterministic_per_seed_and_per_row(tiny: HiFT) -> None:
    mel = torch.randn(3, 80, 8, generator=torch.Generator().manual_seed(2))
    a, sa = tiny.inference(mel, None, generators(4, 5, 6))
    b, sb = tiny.inference(mel, None, generators(4, 5, 6))
    assert torch.equal(a, b) and torch.equal(sa, sb)
    c, _ = tiny.inference(mel, None, generators(7, 5, 6))
    assert not torch.equal(a[0], c[0]) and torch.equal(a[1:], c[1:])



def test_given_excitation_equal_to_the_seeded_draws_gives_the_same_audio(tiny: HiFT) -> None:
    mel = torch.randn(2, 80, 9, generator=torch.Generator().manual_seed(5))
    H, N = TINY.nb_harmonics + 1, 480 * 9
    seeded = tiny.inference(mel, None, generators(4, 5))
    drawn = [draw_excitation(g, H, N) for g in generators(4, 5)]  # what rows 0 and 1 draw
    given = tiny.inference(mel, None, generators(0, 0), drawn)
    assert torch.equal(given[0], seeded[0]) and torch.equal(given[1], seeded[1])
    mixed = tiny.inference(mel, None, generators(0, 5), [drawn[0], None])  # row 1 still draws
    assert torch.equal(mixed[0], seeded[0])
    other_noise = Excitation(drawn[0].phase, torch.randn(H, N, generator=torch.Generator().manual_seed(8)))
    other_phase = Excitation(drawn[0].phase + 1.0, drawn[0].noise)
    for other in (other_noise, other_phase):
        speech, _ = tiny.inference(mel, None, generators(0, 5), [other, None])
        assert not torch.equal(speech[0], seeded[0][0]) and torch.equal(speech[1], seeded[0][1])
    with pytest.raises(ValueError, match=r"excitation row 0: expected phase \(9, 1\) and noise \(9, 4320\)"):
        tiny.inference(mel, None, generators(0, 5), [draw_excitation(None, H, N - 1), None])
    with pytest.raises(ValueError, match="expected 2 excitation entries"):
        tiny.inference(mel, None, generators(0, 5), drawn[:1])


def test_batched_rows_equal_rows_alone(tiny_path: Path) -> None:
    """In float64, so that batched-vs-single convolution rounding (which the random tiny network amplifies
    to ~1e-3 in float32) cannot hide a row mix-up."""
    model = load_hift(tiny_path, TINY).double()
    mel = torch.randn(3, 80, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cache = torch.randn(3, 1, 960, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.1
    batched, source = model.inference(mel, cache, generators(4, 5, 6))
    for row, seed in enumerate((4, 5, 6)):
        alone, alone_source = model.inference(mel[row:row + 1], cache[row:row + 1], generators(seed))
        torch.testing.assert_close(alone[0], batched[row], rtol=0, atol=1e-9)
        torch.testing.assert_close(alone_source[0], source[row], rtol=0, atol=1e-9)


def test_source_module_follows_the_nsf_formula(tiny: HiFT) -> None:
    """Only the fundamental through l_linear: voiced = tanh(0.1 sin(2 pi f n / sr) + N(0, 0.003)),
    unvoiced = tanh(N(0, 0.1 / 3))."""
    m_source = tiny.m_source
    saved = m_source.l_linear.weight.detach().clone(), m_source.l_linear.bias.detach().clone()
    with torch.no_grad():
        m_source.l_linear.weight.zero_()
        m_source.l_linear.weight[0, 0] = 1.0
        m_source.l_linear.bias.zero_()
    try:
        n = torch.arange(4800)
        f0 = torch.cat([torch.full((1, 4800), 200.0), torch.zeros(1, 4800)], dim=1)  # voiced, then silent
        with torch.no_grad():
            s = m_source(f0, generators(0))[0, 0]
        expected = torch.tanh(0.1 * torch.sin(2 * math.pi * 200.0 * (n + 1) / 24000))  # cumsum starts at f/sr
        voiced_err = (s[:4800] - expected).std()
        assert 0.002 < voiced_err < 0.004  # the voiced noise std 0.003
        assert 0.028 < s[4800:].std() < 0.039  # tanh of N(0, 0.0333)
    finally:
        with torch.no_grad():
            m_source.l_linear.weight.copy_(saved[0])
            m_source.l_linear.bias.copy_(saved[1])


def test_excitation_draws_equal_fresh_draws_from_the_session_generator(
    tiny: HiFT, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows draw in place into one batch buffer; the values are those of fresh rand / randn calls."""
    f0 = torch.full((2, 960), 150.0)
    with torch.no_grad():
        got = tiny.m_source(f0, generators(2, 3))

    def fresh(phase: torch.Tensor, noise: torch.Tensor, g: torch.Generator | None) -> None:
        phase.copy_((torch.rand(phase.shape, generator=g) * 2 - 1) * math.pi)
        noise.copy_(torch.randn(noise.shape, generator=g))

    monkeypatch.setattr("voice_agent.model.cosy2.hift._draw_row", fresh)
    with torch.no_grad():
        want = tiny.m_source(f0, generators(2, 3))
    assert torch.equal(got, want)
