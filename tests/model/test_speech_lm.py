"""Model core I end to end on tiny checkpoints written by `make_tiny`: loading every layout, parity of
the loaded LLM with transformers, batched replies == each alone, the schedule in a real run, errors."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from voice_agent.engine.reply import Reply, decode_text, decode_tts, prefill
from voice_agent.errors import CheckpointError
from voice_agent.model.speech_lm import SpeechLM
from voice_agent.model.tiny import make_tiny
from voice_agent.model.tokenizer import Turn

RATE = 16_000
FINAL_UNITS = 25  # cap on the final flush: a random TTS LM rarely samples its eos


def speechlike(seconds: float, seed: int) -> np.ndarray:
    """A voiced, amplitude-modulated signal: enough structure to give distinct encoder outputs."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 110 + 40 * rng.random()
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8))
    x *= 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.1 * x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=3)


@pytest.fixture(scope="module")
def lm(tiny):
    return SpeechLM.load(tiny.model_dir)


def run_alone(lm: SpeechLM, audio: np.ndarray, **kw) -> Reply:
    from voice_agent.tools.generate import run_reply

    return run_reply(lm, audio, final_units=FINAL_UNITS, **kw)[0]


def run_batched(lm: SpeechLM, audios: list[np.ndarray], seeds: list[int], temperature: float, max_new: int):
    """Several replies advanced together by the batched steps, as the engine does."""
    feats = lm.speech_features(audios)
    ids = lm.tok.build_prompt([Turn.user()])
    embeds = [lm.embed_prompt(ids, [feats.row(i)]) for i in range(len(audios))]
    replies = [
        Reply.start(lm, llm_slot=i, tts_slot=i, temperature=temperature, max_new_tokens=max_new, seed=s)
        for i, s in enumerate(seeds)
    ]
    for r in replies:
        r.schedule.final_units = FINAL_UNITS
    llm_cache = lm.new_llm_cache(len(audios), embeds[0].shape[0] + max_new + 1)
    tts_cache = lm.new_tts_cache(len(audios), 4 * max_new + 1100)
    prefill(lm, replies, embeds, llm_cache)
    while not all(r.done for r in replies):
        text = [r for r in replies if r.wants_text]
        if text:
            decode_text(lm, text, llm_cache)
        speech = [r for r in replies if r.wants_tts]
        if speech:
            decode_tts(lm, speech, tts_cache)
    return replies


def test_loads_every_layout_to_the_same_model(tmp_path, tiny, lm):
    audio = speechlike(1.5, 0)
    expected = run_alone(lm, audio, temperature=0, max_new_tokens=7, seed=0)
    for name, kw in {
        "sharded": dict(sharded=True),
        "tied_without_stored_lm_head": dict(store_lm_head=False),
    }.items():
        other = SpeechLM.load(make_tiny(tmp_path / name, seed=3, **kw).model_dir)
        got = run_alone(other, audio, temperature=0, max_new_tokens=7, seed=0)
        assert got.text_ids == expected.text_ids, name
        assert got.units == expected.units, name
    untied = SpeechLM.load(make_tiny(tmp_path / "untied", seed=3, tied=False).model_dir)
    assert not untied.llm.tied and lm.llm.tied
    assert not torch.equal(untied.llm.lm_head.weight, untied.llm.model.embed_tokens.weight)


def test_encoder_from_checkpoint_equals_encoder_from_whisper_pt(tiny, lm):
    from_pt = SpeechLM.load(tiny.model_dir, whisper_path=tiny.speech_encoder)
    audio = [speechlike(2.0, 1)]
    a, b = lm.speech_features(audio), from_pt.speech_features(audio)
    torch.testing.assert_close(a.encoder_out, b.encoder_out, rtol=0, atol=0)
    assert a.adapter_out.shape == (1, 300, lm.config.llm.hidden_size)  # 30 s padded: 1500 frames / 5


def test_encoder_pt_found_beside_the_model_when_the_checkpoint_has_no_encoder(tmp_path, tiny):
    root = tmp_path / "set"
    shutil.copytree(tiny.root, root)
    model_dir = root / tiny.model_dir.name
    tensors = load_file(model_dir / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.speech_encoder.")},
              model_dir / "model.safetensors")
    lm = SpeechLM.load(model_dir)  # finds ../speech_encoder/large-v3.pt
    assert lm.encoder.n_state == 128
    (root / "speech_encoder" / "large-v3.pt").unlink()
    with pytest.raises(CheckpointError, match="no model.speech_encoder"):
        SpeechLM.load(model_dir)


def test_llm_matches_transformers_on_the_spliced_prompt(tiny, lm):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = json.loads((tiny.model_dir / "config.json").read_text())
    hf_cfg = Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("speech_generator", "architectures")})
    hf_cfg.model_type = "qwen2"
    hf = Qwen2ForCausalLM(hf_cfg).eval()
    tensors = load_file(tiny.model_dir / "model.safetensors")
    hf_state = {k: v for k, v in tensors.items() if k.startswith(("model.layers", "model.embed", "model.norm"))}
    hf_state["lm_head.weight"] = tensors["lm_head.weight"]
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)

    feats = lm.speech_features([speechlike(1.0, 2)])
    embeds = lm.embed_prompt(lm.tok.build_prompt([Turn.user()]), [feats.row(0)])[None]  # (1, L, H)
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds, output_hidden_states=True)
        positions = torch.arange(embeds.shape[1])[None]
        ours = lm.llm(embeds, positions)
        ours_hidden = lm.llm.model(embeds, positions)
    torch.testing.assert_close(ours, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_hidden, ref.hidden_states[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batched_replies_equal_each_alone(lm, temperature):
    audios = [speechlike(1.0, 10), speechlike(2.5, 11), speechlike(0.5, 12)]
    seeds = [5, 6, 7]
    batched = run_batched(lm, audios, seeds, temperature, max_new=8)
    for audio, seed, got in zip(audios, seeds, batched, strict=True):
        alone = run_alone(lm, audio, temperature=temperature, max_new_tokens=8, seed=seed)
        assert got.text_ids == alone.text_ids
        assert got.units == alone.units
        assert [len(b) for b in got.schedule.unit_blocks] == [len(b) for b in alone.schedule.unit_blocks]


def test_schedule_in_a_real_run(lm):
    reply = run_alone(lm, speechlike(1.0, 4), temperature=0.9, max_new_tokens=10, seed=1)
    blocks = reply.schedule.unit_blocks
    assert reply.finish_reason in ("eos", "max_tokens")
    n = len(reply.text_ids)
    assert len(blocks) == -(-n // 3)  # one read per 3 text tokens, the last read takes 1-3
    assert all(len(b) <= 10 for b in blocks[:-1])
    assert len(blocks[-1]) <= FINAL_UNITS
    assert reply.units == [u for b in blocks for u in b]
    assert all(0 <= u < 6561 for u in reply.units)


def test_greedy_runs_repeat(lm):
    audio = speechlike(1.2, 8)
    a = run_alone(lm, audio, temperature=0, max_new_tokens=6, seed=0)
    b = run_alone(lm, audio, temperature=0, max_new_tokens=6, seed=123)
    assert a.text_ids == b.text_ids and a.units == b.units


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "config.json").unlink(), "config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "model.safetensors"),
        (lambda d: shutil.rmtree(d / "tts_tokenizer"), "tts_tokenizer"),
        (lambda d: (d / "vocab.json").unlink(), "vocab.json"),
    ],
)
def test_bad_files_name_the_file(tmp_path, tiny, damage, match):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny.model_dir, model_dir)
    damage(model_dir)
    with pytest.raises(CheckpointError, match=match):
        SpeechLM.load(model_dir)


def test_shape_mismatch_names_key_and_shapes(tmp_path, tiny):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny.model_dir, model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(128, 64\).*\(3, 64\)"):
        SpeechLM.load(model_dir)


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny.model_dir, model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    bias = tensors.pop("speech_generator.gate.0.bias")
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key.*speech_generator\.gate\.0\.bias"):
        SpeechLM.load(model_dir)
    tensors["speech_generator.gate.0.bias"] = bias
    tensors["model.layers.9.extra.weight"] = torch.zeros(1)
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected key.*model\.layers\.9\.extra\.weight"):
        SpeechLM.load(model_dir)


def test_generation_config_sets_the_decoding_defaults(tmp_path):
    """A Qwen2.5-Instruct-style generation_config.json: its sampling settings become the default, its eos
    list stops generation, and with temperature 0 the repetition penalty still applies (as generate does)."""
    lm = SpeechLM.load(make_tiny(tmp_path, seed=3, with_generation_config=True).model_dir)
    g = lm.generation
    assert g.sampling.do_sample and (g.sampling.temperature, g.sampling.top_k, g.sampling.top_p) == (0.7, 20, 0.8)
    assert set(g.eos_token_ids) == {lm.tok.im_end_id, lm.tok.tts_eos_id}
    default = Reply.start(lm, llm_slot=0, tts_slot=0)
    assert default.text_params == g.sampling and not default.tts_params.greedy
    greedy = Reply.start(lm, llm_slot=0, tts_slot=0, temperature=0)
    assert greedy.text_params.greedy and greedy.text_params.repetition_penalty == 1.1
    assert greedy.tts_params.greedy
    plain = SpeechLM.load(make_tiny(tmp_path / "plain", seed=3).model_dir)
    assert Reply.start(plain, llm_slot=0, tts_slot=0, temperature=0).text_params.repetition_penalty == 1.0


def test_unpadded_batch_rows_equal_each_row_alone(tiny):
    """The unpadded option (changes numbers vs the 30-s padding) keeps batched == alone for rows of
    different lengths: per-row mel, zeros past each row at both convolutions, per-row attention keys."""
    lm = SpeechLM.load(tiny.model_dir, unpadded=True)
    audios = [speechlike(0.7, 20), speechlike(2.3, 21), speechlike(1.0, 22)]
    batch = lm.speech_features(audios)
    assert batch.lengths == [7, 23, 10]  # 10 Hz adapter frames, rounded up to whole frames
    for i, audio in enumerate(audios):
        alone = lm.speech_features([audio])
        assert alone.lengths == [batch.lengths[i]]
        torch.testing.assert_close(batch.row(i), alone.row(0), rtol=1e-5, atol=1e-5)
    padded = SpeechLM.load(tiny.model_dir).speech_features(audios[:1])
    assert padded.row(0).shape[0] == 300 and not torch.allclose(padded.row(0)[:7], batch.row(0), atol=1e-3)


def reference_encoder(whisper_file, checkpoint_dir, n_head: int):
    """openai-whisper's AudioEncoder with the file's other dims and `n_head` heads, holding the checkpoint's
    `model.speech_encoder.*` tensors (what the reference builds, then loads)."""
    from whisper.model import AudioEncoder

    dims = torch.load(whisper_file, weights_only=True)["dims"]
    encoder = AudioEncoder(dims["n_mels"], dims["n_audio_ctx"], dims["n_audio_state"], n_head,
                           dims["n_audio_layer"])
    prefix = "model.speech_encoder."
    tensors = load_file(checkpoint_dir / "model.safetensors")
    encoder.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return encoder.eval()


def test_encoder_heads_come_from_the_whisper_file_and_are_assumed_64_wide_without_it(tmp_path, caplog):
    # 4 heads of width 32: the tensors are the same shapes as 2 heads of 64, only the whisper dims tell
    paths = make_tiny(tmp_path / "set", seed=3, whisper_head_dim=32)
    whisper_file = tmp_path / "large-v3.pt"
    whisper_file.write_bytes(paths.speech_encoder.read_bytes())
    assert torch.load(whisper_file, weights_only=True)["dims"]["n_audio_head"] == 4
    mel = torch.randn(1, 128, 3000, generator=torch.Generator().manual_seed(0))
    four, two = (reference_encoder(whisper_file, paths.model_dir, n) for n in (4, 2))
    with torch.no_grad():
        want4, want2 = four(mel), two(mel)
    assert (want4 - want2).abs().max() > 1e-3  # small random weights, yet 100x the tolerance below

    with caplog.at_level(logging.INFO, logger="voice_agent.model.encoder"):
        beside = SpeechLM.load(paths.model_dir)  # finds ../speech_encoder/large-v3.pt
    assert beside.encoder.dims.n_head == 4 and "assuming" not in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(beside.encoder(mel), want4, rtol=1e-5, atol=1e-5)

    paths.speech_encoder.unlink()
    with caplog.at_level(logging.INFO, logger="voice_agent.model.encoder"):
        inferred = SpeechLM.load(paths.model_dir)
    assert inferred.encoder.dims.n_head == 2  # n_state 128 // 64: the documented fallback
    assert "no whisper file gives its dims; assuming 64-wide attention heads (n_head = 2)" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(inferred.encoder(mel), want2, rtol=1e-5, atol=1e-5)

    given = SpeechLM.load(paths.model_dir, whisper_path=whisper_file)  # an explicit file: its dims again
    assert given.encoder.dims.n_head == 4
    assert torch.equal(given.encoder.blocks[0].attn.query.weight, beside.encoder.blocks[0].attn.query.weight)


def test_whisper_file_dims_that_contradict_the_checkpoint_are_an_error(tmp_path, tiny):
    other = tmp_path / "other.pt"
    data = torch.load(tiny.speech_encoder, weights_only=True)
    data["dims"]["n_audio_layer"] = 3
    torch.save(data, other)
    with pytest.raises(CheckpointError, match=r"whisper file's .*\(128, 1500, 128, 3\), found \(128, 1500, 128, 2\)"):
        SpeechLM.load(tiny.model_dir, whisper_path=other)
    with pytest.raises(CheckpointError, match="missing file"):
        SpeechLM.load(tiny.model_dir, whisper_path=tmp_path / "absent.pt")


def test_speech_positions_are_the_lengths_speech_features_gives(tiny, lm):
    unpadded = SpeechLM.load(tiny.model_dir, unpadded=True)
    for seconds in (0.05, 0.1, 0.1001, 1.55, 29.99):
        audio = speechlike(seconds, 30)
        assert lm.speech_positions(len(audio)) == lm.speech_features([audio]).lengths[0] == 300
        assert unpadded.speech_positions(len(audio)) == unpadded.speech_features([audio]).lengths[0], seconds
    assert unpadded.speech_positions(31 * RATE) == 300  # the encoder takes 30 s at most


def test_tts_positions_cover_a_reply(lm):
    R, W = lm.config.read_tokens, lm.config.write_units
    assert (R, W) == (3, 10)
    assert lm.reply_units(7, 12) == 10 * (7 // 3 + 1) + 12 == 42
    assert lm.tts_positions(7, 12) == 7 + 2 + 42
    reply = run_alone(lm, speechlike(1.0, 4), temperature=0.9, max_new_tokens=7, seed=1)
    assert len(reply.units) <= lm.reply_units(7, FINAL_UNITS)
    assert reply.tts_len <= lm.tts_positions(7, FINAL_UNITS)
