"""Tests of the CosyVoice2 flow: config, official key tree, loading errors, inference maths, streaming."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from voice_agent.engine.flow_stream import (
    FlowStream,
    StreamState,
    bounded_context_deviation,
    flow_block_times,
    push_many,
    stream_reply,
)
from voice_agent.errors import CheckpointError
from voice_agent.model.cosy2.flow import Flow, NoiseSource, load_flow
from voice_agent.model.cosy2.flow_config import FlowConfig
from voice_agent.model.cosy2.flow_encoder import RelPositionMultiHeadedAttention, chunk_mask, relative_positions
from voice_agent.model.cosy2.tiny import write_tiny_flow

CFG = FlowConfig.tiny()
SMALL_CHUNKS = CFG.with_chunks(5, 10)  # same weights, 5-unit / 10-frame chunks: chunk effects on short input


@pytest.fixture(scope="module")
def flow(flow_path: Path) -> Flow:
    return load_flow(flow_path, CFG)


def _units(n: int, seed: int) -> list[int]:
    return torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _spk(seed: int, rows: int | None = None) -> torch.Tensor:
    shape = (CFG.spk_embed_dim,) if rows is None else (rows, CFG.spk_embed_dim)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---- config -------------------------------------------------------------------------------------------


def test_config_defaults_are_the_official_values() -> None:
    cfg = FlowConfig()
    assert (cfg.vocab_size, cfg.input_size, cfg.output_size, cfg.spk_embed_dim) == (6561, 512, 80, 192)
    assert (cfg.token_mel_ratio, cfg.pre_lookahead_len, cfg.lookahead_frames) == (2, 3, 6)
    assert (cfg.encoder_attention_heads, cfg.encoder_linear_units, cfg.encoder_num_blocks) == (8, 2048, 6)
    assert (cfg.encoder_num_up_blocks, cfg.encoder_chunk_tokens, cfg.decoder_chunk_frames) == (4, 50, 100)
    assert (cfg.estimator_in_channels, cfg.estimator_channels, cfg.time_embed_dim) == (320, 256, 1024)
    assert (cfg.estimator_n_blocks, cfg.estimator_num_mid_blocks, cfg.estimator_num_heads) == (4, 12, 8)
    assert (cfg.n_timesteps, cfg.t_scheduler, cfg.inference_cfg_rate, cfg.noise_frames) == (
        10,
        "cosine",
        0.7,
        15000,
    )


def test_config_reads_the_official_yaml_section_and_round_trips() -> None:
    official = {  # the cosyvoice.yaml `flow:` section as plain dicts (tags dropped, refs resolved)
        "input_size": 512,
        "output_size": 80,
        "spk_embed_dim": 192,
        "output_type": "mel",
        "vocab_size": 6561,
        "input_frame_rate": 25,
        "only_mask_loss": True,
        "token_mel_ratio": 2,
        "pre_lookahead_len": 3,
        "encoder": {
            "output_size": 512,
            "attention_heads": 8,
            "linear_units": 2048,
            "num_blocks": 6,
            "input_layer": "linear",
            "use_cnn_module": False,
            "macaron_style": False,
            "input_size": 512,
        },
        "decoder": {
            "in_channels": 240,
            "n_spks": 1,
            "spk_emb_dim": 80,
            "cfm_params": {
                "content": {
                    "sigma_min": 1e-6,
                    "solver": "euler",
                    "t_scheduler": "cosine",
                    "training_cfg_rate": 0.2,
                    "inference_cfg_rate": 0.7,
                }
            },
            "estimator": {
                "in_channels": 320,
                "out_channels": 80,
                "causal": True,
                "channels": [256],
                "attention_head_dim": 64,
                "n_blocks": 4,
                "num_mid_blocks": 12,
                "num_heads": 8,
            },
        },
    }
    assert FlowConfig.from_yaml(official) == FlowConfig()
    assert FlowConfig.from_yaml({}) == FlowConfig()
    assert FlowConfig.from_yaml(FlowConfig().yaml_section()) == FlowConfig()
    assert FlowConfig.from_yaml(CFG.yaml_section()) == CFG
    assert "num_up_blocks" not in FlowConfig().yaml_section()["encoder"]


def test_config_rejects_bad_values_naming_the_field() -> None:
    with pytest.raises(ValueError, match="flow.encoder.num_blocks"):
        FlowConfig.from_yaml({"encoder": {"num_blocks": "six"}})
    with pytest.raises(ValueError, match="channels"):
        FlowConfig.from_yaml({"decoder": {"estimator": {"channels": [256, 256]}}})
    with pytest.raises(ValueError, match="encoder_attention_heads"):
        FlowConfig(encoder_attention_heads=3)
    with pytest.raises(ValueError, match="estimator_in_channels"):
        FlowConfig(estimator_in_channels=240)


# ---- module tree and files ----------------------------------------------------------------------------


def test_official_module_tree_has_the_flow_pt_keys_and_shapes() -> None:
    with torch.device("meta"):
        state = Flow(FlowConfig()).state_dict()
    assert len(state) == 1121
    assert sum(t.numel() for t in state.values()) == 112_549_360
    expected = {
        "input_embedding.weight": (6561, 512),
        "spk_embed_affine_layer.weight": (80, 192),
        "encoder.embed.out.1.weight": (512,),
        "encoder.pre_lookahead_layer.conv1.weight": (512, 512, 4),
        "encoder.pre_lookahead_layer.conv2.weight": (512, 512, 3),
        "encoder.encoders.5.self_attn.pos_bias_u": (8, 64),
        "encoder.encoders.5.self_attn.linear_pos.weight": (512, 512),
        "encoder.encoders.0.feed_forward.w_1.weight": (2048, 512),
        "encoder.up_layer.conv.weight": (512, 512, 5),
        "encoder.up_encoders.3.norm_mha.weight": (512,),
        "encoder.after_norm.bias": (512,),
        "encoder_proj.weight": (80, 512),
        "decoder.estimator.time_mlp.linear_1.weight": (1024, 320),
        "decoder.estimator.down_blocks.0.0.block1.block.0.weight": (256, 320, 3),
        "decoder.estimator.down_blocks.0.0.mlp.1.weight": (256, 1024),
        "decoder.estimator.down_blocks.0.2.weight": (256, 256, 3),
        "decoder.estimator.mid_blocks.11.1.3.attn1.to_q.weight": (512, 256),
        "decoder.estimator.mid_blocks.11.1.3.attn1.to_out.0.bias": (256,),
        "decoder.estimator.mid_blocks.0.1.0.ff.net.0.proj.weight": (1024, 256),
        "decoder.estimator.up_blocks.0.0.block1.block.0.weight": (256, 512, 3),
        "decoder.estimator.up_blocks.0.0.res_conv.weight": (256, 512, 1),
        "decoder.estimator.final_block.block.2.weight": (256,),
        "decoder.estimator.final_proj.weight": (80, 256, 1),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert "encoder.encoders.0.self_attn.linear_pos.bias" not in state
    assert "decoder.estimator.mid_blocks.0.1.0.attn1.to_q.bias" not in state


def test_tiny_flow_file_is_deterministic_and_loads(flow_path: Path, tmp_path: Path) -> None:
    write_tiny_flow(tmp_path / "a.pt", CFG, seed=0)
    write_tiny_flow(tmp_path / "b.pt", CFG, seed=1)
    assert (tmp_path / "a.pt").read_bytes() == flow_path.read_bytes()
    assert (tmp_path / "b.pt").read_bytes() != flow_path.read_bytes()
    flow = load_flow(flow_path, CFG)
    mel, _ = flow.inference(torch.tensor([_units(20, 0)]), torch.tensor([20]), _spk(0, 1), True)
    assert mel.shape == (1, 80, 40) and torch.isfinite(mel).all()
    assert -10 < float(mel.mean()) < -2 and 0.5 < float(mel.std()) < 3  # log-mel-like range


def _resave(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def test_loading_errors_name_the_file_and_key(flow_path: Path, tmp_path: Path) -> None:
    state = torch.load(flow_path, weights_only=True)
    missing = dict(state)
    del missing["encoder.after_norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing key.*encoder\.after_norm\.weight"):
        load_flow(_resave(missing, tmp_path / "missing.pt"), CFG)
    wrong = dict(state, **{"encoder_proj.weight": torch.zeros(80, 65)})
    with pytest.raises(CheckpointError, match=r"encoder_proj\.weight.*\(80, 64\).*\(80, 65\)"):
        load_flow(_resave(wrong, tmp_path / "wrong.pt"), CFG)
    extra = dict(state, **{"decoder.estimator.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected key.*decoder\.estimator\.extra\.weight"):
        load_flow(_resave(extra, tmp_path / "extra.pt"), CFG)
    with pytest.raises(CheckpointError, match=r"no prefix.*'flow\.input_embedding\.weight'"):
        load_flow(_resave({"flow." + k: v for k, v in state.items()}, tmp_path / "prefixed.pt"), CFG)
    with pytest.raises(CheckpointError, match="nested"):
        load_flow(_resave({"nested": dict(state)}, tmp_path / "nested.pt"), CFG)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(flow_path.read_bytes()[: flow_path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_flow(truncated, CFG)
    with pytest.raises(CheckpointError, match=r"missing key.*encoder\.encoders\.2\."):
        load_flow(flow_path, FlowConfig(**{**CFG.as_dict(), "encoder_num_blocks": 3}))  # config != file


# ---- maths --------------------------------------------------------------------------------------------


def test_rel_pos_attention_matches_the_direct_score_formula() -> None:
    torch.manual_seed(0)
    H, D, T = 2, 8, 5
    attn = RelPositionMultiHeadedAttention(H, D)
    with torch.no_grad():
        attn.pos_bias_u.normal_()
        attn.pos_bias_v.normal_()
    x = torch.randn(2, T, D)
    mask = chunk_mask(T, 2)[None] & (torch.arange(T) < torch.tensor([[T], [3]]))[:, None, :]  # (2, T, T)
    got = attn(x, mask, relative_positions(T, D, x.device, x.dtype))

    d_k = D // H
    freq = [10000 ** (-2 * m / D) for m in range(D // 2)]

    def pe(r: int) -> torch.Tensor:
        return torch.tensor([f(r * w) for w in freq for f in (math.sin, math.cos)])  # interleaved

    q, k, v = (lin(x).view(2, T, H, d_k) for lin in (attn.linear_q, attn.linear_k, attn.linear_v))
    want = torch.zeros(2, T, H, d_k)
    for b in range(2):
        for h in range(H):
            for i in range(T):
                scores = torch.full((T,), float("-inf"))
                for j in range(T):
                    if mask[b, i, j]:
                        p = attn.linear_pos(pe(i - j)).view(H, d_k)[h]
                        scores[j] = (
                            (q[b, i, h] + attn.pos_bias_u[h]) @ k[b, j, h] + (q[b, i, h] + attn.pos_bias_v[h]) @ p
                        ) / math.sqrt(d_k)
                want[b, i, h] = torch.softmax(scores, 0) @ v[b, :, h]
    torch.testing.assert_close(got, attn.linear_out(want.reshape(2, T, D)), atol=1e-5, rtol=1e-5)


def test_chunk_mask_sees_full_left_context_and_its_own_chunk() -> None:
    m = chunk_mask(5, 2).int().tolist()
    assert m == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_batch_rows_equal_each_row_alone(flow: Flow) -> None:
    lens, finals = [37, 12, 25, 2], [True, False, True, False]
    tokens = torch.zeros(4, 37, dtype=torch.long)
    for r, n in enumerate(lens):
        tokens[r, :n] = torch.tensor(_units(n, r))
    tokens[1, 12:] = -1  # padding content must not matter
    spk = _spk(1, 4)
    mel, mel_lens = flow.inference(tokens, torch.tensor(lens), spk, finals)
    assert mel_lens.tolist() == [74, 18, 50, 0]  # non-final rows drop 6 frames
    for r, n in enumerate(lens):
        alone, alone_lens = flow.inference(tokens[r : r + 1, :n], torch.tensor([n]), spk[r : r + 1], finals[r])
        assert int(alone_lens) == int(mel_lens[r])
        torch.testing.assert_close(mel[r, :, : mel_lens[r]], alone[0], atol=1e-5, rtol=1e-5)
        assert mel[r, :, mel_lens[r] :].abs().max() == 0 if mel_lens[r] < mel.size(2) else True


def test_inference_rejects_bad_inputs(flow: Flow) -> None:
    with pytest.raises(ValueError, match=r"unit ids in \[0, 6561\)"):
        flow.inference(torch.tensor([[1, 6561]]), torch.tensor([2]), _spk(0, 1), True)
    with pytest.raises(ValueError, match="spk: expected shape"):
        flow.inference(torch.tensor([[1, 2]]), torch.tensor([2]), _spk(0), True)
    with pytest.raises(ValueError, match="noise: expected shape"):
        flow.inference(torch.tensor([[1, 2]]), torch.tensor([2]), _spk(0, 1), True, torch.zeros(1, 80, 3))


# ---- streaming ----------------------------------------------------------------------------------------


def test_stream_frame_bookkeeping_follows_the_live_schedule(flow: Flow) -> None:
    units = _units(35, 2)
    stream = FlowStream(flow, _spk(2), seed=7)
    sizes = [stream.push(units[b : b + 10], final=b == 30).shape for b in range(0, 35, 10)]
    assert sizes == [(80, 14), (80, 20), (80, 20), (80, 16)]
    assert stream.token_offset == 35 and stream.state is StreamState.FINISHED
    with pytest.raises(ValueError, match="open stream"):
        stream.push([1], final=True)
    short = FlowStream(flow, _spk(2), seed=7)
    assert short.push([5, 6], final=False).shape == (80, 0) and short.token_offset == 0
    assert short.push([], final=True).shape == (80, 4)


def test_faithful_stream_repeats_the_reference_prefix_recompute(flow: Flow) -> None:
    units, spk = _units(33, 3), _spk(3)
    got = torch.cat(stream_reply(flow, units, 10, None, spk, seed=4), dim=1)
    want, offset, noise = [], 0, NoiseSource(4)
    for b in range(0, 33, 10):  # reference: flow on all units so far, keep mel from 2 * token_offset
        n, final = min(b + 10, 33), b + 10 >= 33
        mel, _ = flow.inference(torch.tensor([units[:n]]), torch.tensor([n]), spk[None], final, noise)
        want.append(mel[0, :, 2 * offset :])
        offset = n if final else n - 3
    torch.testing.assert_close(got, torch.cat(want, dim=1), atol=1e-5, rtol=1e-5)


def test_stream_equals_offline_when_each_push_completes_a_chunk(flow_path: Path) -> None:
    # Exact only when every emitted frame's chunk (5 units / 10 frames here) plus its 3 look-ahead units was
    # complete at the push that emitted it: attention is bidirectional within a chunk, so with the live
    # 10-unit schedule and 50-unit chunks the emitted frames of a half-filled chunk differ from offline
    # (as in the reference). Float rounding differs with the sequence length, hence the tolerance.
    flow = load_flow(flow_path, SMALL_CHUNKS)
    units, spk = _units(38, 5), _spk(5)
    stream = FlowStream(flow, spk, seed=3)
    pushes = [(0, 8)] + [(b, b + 5) for b in range(8, 33, 5)]
    blocks = [stream.push(units[a:b], final=False) for a, b in pushes] + [stream.push(units[33:], final=True)]
    assert [m.size(1) for m in blocks] == [10, 10, 10, 10, 10, 10, 16]
    offline, _ = flow.inference(torch.tensor([units]), torch.tensor([38]), spk[None], True, NoiseSource(3))
    torch.testing.assert_close(torch.cat(blocks, dim=1), offline[0], atol=1e-5, rtol=1e-5)


def test_bounded_context_covering_the_reply_equals_faithful(flow: Flow) -> None:
    units = _units(45, 6)
    faithful = torch.cat(stream_reply(flow, units, 10, None, _spk(6), seed=1), dim=1)
    bounded = torch.cat(stream_reply(flow, units, 10, 45, _spk(6), seed=1), dim=1)
    torch.testing.assert_close(bounded, faithful, atol=0, rtol=0)


def test_bounded_context_deviation_is_small_and_cost_is_flat(flow: Flow) -> None:
    units = _units(160, 7)
    dev = bounded_context_deviation(flow, units, context_units=20, spk=_spk(7), seed=2)
    assert dev.frames == 320 and math.isfinite(dev.max_abs)
    assert 0 <= dev.rel_rms < 0.1  # measured, not zero: ~0.01 on this tiny model
    stream = FlowStream(flow, _spk(7), seed=2, context_units=20)
    windows = []
    for b in range(0, 160, 10):
        stream.push(units[b : b + 10], final=b == 150)
        windows.append(stream.last_window_units)
    # window = at least 20 units of context rounded down to a 50-unit chunk boundary, + block + look-ahead
    assert max(windows) <= 20 + 49 + 10 + 3
    assert max(windows[8:]) <= max(windows[:8])
    assert len(stream.noise._blocks) <= 2  # old noise blocks are freed


def test_push_many_equals_each_stream_alone(flow: Flow) -> None:
    def streams() -> list[FlowStream]:
        out = [FlowStream(flow, _spk(10 + i), seed=20 + i, context_units=c) for i, c in enumerate([None, 20, None])]
        out[0].push(_units(23, 1), final=False)
        out[1].push(_units(61, 2), final=False)
        return out

    blocks, finals = [_units(10, 3), _units(7, 4), _units(12, 5)], [False, True, True]
    batched = push_many(streams(), blocks, finals)
    alone = [s.push(b, f) for s, b, f in zip(streams(), blocks, finals, strict=True)]
    assert [m.size(1) for m in batched] == [20, 6 + 14, 24]
    for got, want in zip(batched, alone, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert push_many([], [], []) == []


def test_noise_source_is_deterministic_lazy_and_releasable() -> None:
    a, b = NoiseSource(9, block_frames=100), NoiseSource(9, block_frames=100)
    whole = a.frames(0, 350)
    assert whole.shape == (80, 350)
    torch.testing.assert_close(torch.cat([b.frames(0, 120), b.frames(120, 350)], dim=1), whole, atol=0, rtol=0)
    assert not torch.equal(NoiseSource(10, block_frames=100).frames(0, 350), whole)
    b.release_before(250)
    torch.testing.assert_close(b.frames(200, 300), whole[:, 200:300], atol=0, rtol=0)
    with pytest.raises(ValueError, match="released"):
        b.frames(150, 160)


def test_given_noise_serves_its_frames_and_nothing_past_them() -> None:
    values = torch.randn(80, 30, generator=torch.Generator().manual_seed(1))
    given = NoiseSource.given(values)
    assert torch.equal(given.frames(5, 30), values[:, 5:])
    given.release_before(10)
    assert torch.equal(given.frames(12, 20), values[:, 12:20])  # one block: nothing is freed before frame 30
    assert given.frames(30, 30).shape == NoiseSource(1, block_frames=30).frames(30, 30).shape == (80, 0)
    with pytest.raises(ValueError, match="30 frames were given, frames up to 31 are needed"):
        given.frames(0, 31)
    with pytest.raises(ValueError, match=r"expected float values \(channels, T >= 1\)"):
        NoiseSource.given(torch.zeros(80, dtype=torch.long))


def test_flow_block_times_gives_one_time_per_block(flow: Flow) -> None:
    times = flow_block_times(flow, _units(25, 8), block=10)
    assert len(times) == 3 and all(t > 0 for t in times)


def test_estimator_shortcuts_without_padding_give_the_same_numbers(flow: Flow) -> None:
    """No padded row: the mask multiplications are skipped and one bias (or none, T <= chunk) is shared by
    every row; the result must equal the general padded path bit for bit."""
    est = flow.decoder.estimator
    g = torch.Generator().manual_seed(3)
    for T in (60, 230):  # within one chunk (no bias at all), across chunks (one shared bias)
        x, mu, cond = (torch.randn(3, 80, T, generator=g) for _ in range(3))
        spks, t = torch.randn(3, 80, generator=g), torch.rand(3, generator=g)
        mask = torch.ones(3, 1, T)
        general = chunk_mask(T, est.chunk)[None].expand(3, -1, -1)  # (B, T, T) as for padded rows
        bias = ((1.0 - general.float()) * torch.finfo(torch.float32).min)[:, None]
        with torch.inference_mode():
            fast = est(x, mask, mu, t, spks, cond)
            slow = est(x, mask, mu, t, spks, cond, bias, True)
        assert (est.attention_bias(mask, torch.float32) is None) == (T <= est.chunk)
        assert torch.equal(fast, slow)
