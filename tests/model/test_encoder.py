"""Tests for the Whisper encoder and the speech adapter (voice_agent.model.encoder, .adapter).

openai-whisper is the reference: the same random weights must give the same outputs, and whisper's own
model/checkpoint writer produces the `.pt` files the loader reads.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file
from whisper.model import AudioEncoder, ModelDimensions, Whisper
from whisper.model import sinusoids as whisper_sinusoids

from voice_agent.errors import CheckpointError
from voice_agent.model.adapter import SpeechProjector, projector_from_checkpoint
from voice_agent.model.encoder import (
    WhisperDims,
    WhisperEncoder,
    encoder_from_checkpoint,
    load_whisper_pt,
    read_whisper_dims,
    sinusoids,
)
from voice_agent.model.weights import SafetensorsCheckpoint

# Tiny dims of the test checkpoints: full 30-s context, head dim 64 as in every Whisper model.
N_MELS, N_CTX, N_STATE, N_HEAD, N_LAYER = 128, 1500, 128, 2, 2
PREFIX = "model.speech_encoder."


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (LayerNorm weights and biases too), so every key matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            offset = 1.0 if p.ndim == 1 and p.shape[0] == N_STATE else 0.0  # LayerNorm weights near 1
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + offset)


@pytest.fixture(scope="module")
def reference() -> AudioEncoder:
    encoder = AudioEncoder(N_MELS, N_CTX, N_STATE, N_HEAD, N_LAYER)
    randomize(encoder, seed=0)
    return encoder.eval()


@pytest.fixture(scope="module")
def mel() -> torch.Tensor:
    return torch.randn(2, N_MELS, 2 * N_CTX, generator=torch.Generator().manual_seed(1))  # (2, 128, 3000)


def test_encoder_matches_whisper_with_same_weights(reference: AudioEncoder, mel: torch.Tensor) -> None:
    ours = WhisperEncoder(N_MELS, N_CTX, N_STATE, N_HEAD, N_LAYER)
    assert sorted(ours.state_dict()) == sorted(reference.state_dict())  # key names and persistence
    ours.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        out = ours(mel)
        expected = reference(mel)
    assert out.shape == (2, N_CTX, N_STATE)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_batch_rows_equal_single_rows(reference: AudioEncoder, mel: torch.Tensor) -> None:
    ours = WhisperEncoder(N_MELS, N_CTX, N_STATE, N_HEAD, N_LAYER)
    ours.load_state_dict(reference.state_dict())
    with torch.no_grad():
        together = ours(mel)
        for i in range(2):
            torch.testing.assert_close(together[i : i + 1], ours(mel[i : i + 1]), atol=1e-5, rtol=1e-5)


def test_faithful_mode_requires_full_window_and_unpadded_mode_uses_leading_positions(
    reference: AudioEncoder, mel: torch.Tensor
) -> None:
    ours = WhisperEncoder(N_MELS, N_CTX, N_STATE, N_HEAD, N_LAYER)
    ours.load_state_dict(reference.state_dict())
    short = mel[:, :, :300]  # 3 s
    with pytest.raises(ValueError, match="expected 3000 mel frames"):
        ours(short)
    with pytest.raises(ValueError, match="at most 3000"):
        ours(torch.zeros(1, N_MELS, 3002), unpadded=True)
    # Whisper itself runs 3 s only when built with n_ctx = 150 and the first 150 positions.
    short_ref = AudioEncoder(N_MELS, 150, N_STATE, N_HEAD, N_LAYER)
    state = dict(reference.state_dict())
    state["positional_embedding"] = state["positional_embedding"][:150]
    short_ref.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(ours(short, unpadded=True), short_ref(short), atol=1e-5, rtol=1e-5)
        odd = ours(mel[:, :, :301], unpadded=True)
    assert odd.shape == (2, 151, N_STATE)


def test_sinusoids_follow_whispers_formula() -> None:
    ours = sinusoids(N_CTX, 1280)
    assert ours.shape == (N_CTX, 1280) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, whisper_sinusoids(N_CTX, 1280), atol=1e-3, rtol=0)
    assert torch.equal(ours[0, :640], torch.zeros(640)) and torch.equal(ours[0, 640:], torch.ones(640))


def write_whisper_pt(path, seed: int = 0) -> Whisper:
    dims = ModelDimensions(n_mels=N_MELS, n_audio_ctx=N_CTX, n_audio_state=N_STATE, n_audio_head=N_HEAD,
                           n_audio_layer=N_LAYER, n_vocab=64, n_text_ctx=8, n_text_state=64, n_text_head=1,
                           n_text_layer=1)
    model = Whisper(dims)
    randomize(model.encoder, seed)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return model.eval()


def test_load_whisper_pt_equals_whispers_encoder(tmp_path, mel: torch.Tensor) -> None:
    path = tmp_path / "large-v3.pt"
    model = write_whisper_pt(path)
    encoder = load_whisper_pt(path)
    assert encoder.dims == WhisperDims(N_MELS, N_CTX, N_STATE, N_HEAD, N_LAYER)
    assert (encoder.n_mels, encoder.n_ctx, encoder.n_state) == (N_MELS, N_CTX, N_STATE)
    assert not encoder.training
    with torch.no_grad():
        torch.testing.assert_close(encoder(mel), model.encoder(mel), atol=1e-5, rtol=1e-5)
    half = load_whisper_pt(path, "cpu", torch.bfloat16)
    assert half.conv1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = half(mel[:1])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model.encoder(mel[:1]), atol=0.15, rtol=0.05)


def test_bad_whisper_pt_files_raise_checkpoint_error_naming_the_file(tmp_path) -> None:
    good = tmp_path / "good.pt"
    write_whisper_pt(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    for path in (truncated, garbage, tmp_path / "absent.pt"):
        with pytest.raises(CheckpointError, match=path.name):
            load_whisper_pt(path)

    no_dims = tmp_path / "no_dims.pt"
    torch.save({"model_state_dict": {}}, no_dims)
    with pytest.raises(CheckpointError, match=r"no_dims\.pt: expected keys 'dims' and 'model_state_dict'"):
        load_whisper_pt(no_dims)
    bad_dims = tmp_path / "bad_dims.pt"
    data = torch.load(good, weights_only=True)
    data["dims"]["n_audio_state"] = "large"
    torch.save(data, bad_dims)
    with pytest.raises(CheckpointError, match=r"bad_dims\.pt: 'dims.n_audio_state' expected a positive int"):
        load_whisper_pt(bad_dims)


def omni_tensors(reference: AudioEncoder) -> dict[str, torch.Tensor]:
    """Encoder tensors as a LLaMA-Omni2 checkpoint stores them, next to unrelated LLM keys."""
    tensors = {PREFIX + k: v.clone() for k, v in reference.state_dict().items()}
    tensors["model.embed_tokens.weight"] = torch.zeros(4, 8)
    return tensors


def test_encoder_from_checkpoint_derives_dims_and_loads(tmp_path, reference, mel) -> None:
    save_file(omni_tensors(reference), str(tmp_path / "model.safetensors"))
    checkpoint = SafetensorsCheckpoint(tmp_path)
    encoder = encoder_from_checkpoint(checkpoint, source=str(tmp_path))
    assert encoder.dims == WhisperDims(N_MELS, N_CTX, N_STATE, N_HEAD, N_LAYER)
    with torch.no_grad():
        torch.testing.assert_close(encoder(mel), reference(mel), atol=1e-5, rtol=1e-5)


def test_encoder_from_checkpoint_takes_the_head_count_from_given_dims(tmp_path, reference, mel) -> None:
    four_heads = AudioEncoder(N_MELS, N_CTX, N_STATE, 4, N_LAYER)  # head width 32: the shapes cannot tell
    four_heads.load_state_dict(reference.state_dict())
    write_whisper_pt(tmp_path / "large-v3.pt")
    assert read_whisper_dims(tmp_path / "large-v3.pt") == WhisperDims(N_MELS, N_CTX, N_STATE, N_HEAD, N_LAYER)
    dims = WhisperDims(N_MELS, N_CTX, N_STATE, 4, N_LAYER)
    encoder = encoder_from_checkpoint(omni_tensors(reference), source="ckpt", dims=dims)
    assert encoder.dims == dims
    with torch.no_grad():
        torch.testing.assert_close(encoder(mel), four_heads.eval()(mel), atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match=r"ckpt: expected the whisper file's .*\(128, 1500, 256, 2\)"):
        encoder_from_checkpoint(omni_tensors(reference), source="ckpt",
                                dims=WhisperDims(N_MELS, N_CTX, 2 * N_STATE, 4, N_LAYER))


def test_encoder_from_checkpoint_errors_name_key_expected_and_found(reference) -> None:
    tensors = omni_tensors(reference)
    tensors[PREFIX + "blocks.1.mlp.0.bias"] = torch.zeros(100)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.0\.bias' expected \(512,\), found \(100,\)"):
        encoder_from_checkpoint(tensors, source="fake.safetensors")

    tensors = omni_tensors(reference)
    del tensors[PREFIX + "blocks.0.attn.key.weight"]
    with pytest.raises(CheckpointError, match=r"missing key.*fake\.safetensors.*blocks\.0\.attn\.key\.w"):
        encoder_from_checkpoint(tensors, source="fake.safetensors")

    with pytest.raises(CheckpointError, match=r"missing key in fake\.safetensors: 'model\.speech_encoder\."):
        encoder_from_checkpoint({"model.norm.weight": torch.ones(4)}, source="fake.safetensors")

    odd = {PREFIX + "conv1.weight": torch.zeros(96, N_MELS, 3),
           PREFIX + "positional_embedding": torch.zeros(10, 96),
           PREFIX + "blocks.0.attn_ln.weight": torch.zeros(96)}
    with pytest.raises(CheckpointError, match="divisible by head dim 64, got 96"):
        encoder_from_checkpoint(odd, source="fake.safetensors")


def test_projector_concatenates_k_frames_frame_major() -> None:
    torch.manual_seed(0)
    projector = SpeechProjector(encoder_dim=4, k=5, hidden=24, llm_dim=6)
    x = torch.randn(2, 13, 4)  # 13 frames: 3 trailing frames are dropped
    y, lengths = projector(x, torch.tensor([13, 7]))
    assert y.shape == (2, 2, 6)
    assert lengths.tolist() == [2, 1]
    expected = torch.empty(2, 2, 6)
    for b in range(2):
        for j in range(2):
            stacked = torch.cat([x[b, 5 * j + i] for i in range(5)])  # frame 5j's features first
            expected[b, j] = projector.linear2(torch.relu(projector.linear1(stacked)))
    torch.testing.assert_close(y, expected)
    assert sorted(projector.state_dict()) == [f"linear{i}.{p}" for i in (1, 2) for p in ("bias", "weight")]
    with pytest.raises(ValueError, match=r"expected encoder frames of shape \(B, T, 4\)"):
        projector(torch.zeros(1, 10, 3), torch.tensor([10]))


def test_projector_from_checkpoint_reads_hidden_from_shapes() -> None:
    torch.manual_seed(1)
    source = SpeechProjector(encoder_dim=N_STATE, k=5, hidden=40, llm_dim=64)
    tensors = {"model.speech_projector." + k: v for k, v in source.state_dict().items()}
    loaded = projector_from_checkpoint(tensors, k=5, source="fake.safetensors")
    assert (loaded.encoder_dim, loaded.k, loaded.linear1.out_features, loaded.linear2.out_features) == (
        N_STATE, 5, 40, 64)
    x = torch.randn(2, 1500, N_STATE)
    lengths = torch.tensor([1500, 1500])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, lengths)[0], source(x, lengths)[0])
    assert loaded(x, lengths)[0].shape == (2, 300, 64)

    tensors["model.speech_projector.linear2.weight"] = torch.zeros(64, 41)
    with pytest.raises(CheckpointError, match=r"fake\.safetensors.*linear2\.weight \(llm_dim, hidden\)"):
        projector_from_checkpoint(tensors, k=5, source="fake.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key in fake\.safetensors: 'model\.speech_proj"):
        projector_from_checkpoint({}, source="fake.safetensors")
