"""The cosy2_decoder directory: the tiny writer, loading errors, and the cosyvoice.yaml reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from voice_agent.errors import CheckpointError
from voice_agent.model.cosy2.decoder import Cosy2Decoder, read_cosyvoice_yaml
from voice_agent.model.cosy2.flow_config import FlowConfig
from voice_agent.model.cosy2.hift_config import HiFTConfig
from voice_agent.model.cosy2.tiny import write_tiny_cosy2_decoder

TINY = HiFTConfig.tiny()


def test_tiny_decoder_directory_is_deterministic_per_seed(tmp_path: Path, decoder_dir: Path) -> None:
    again = write_tiny_cosy2_decoder(tmp_path / "again", seed=0)
    names = sorted(p.relative_to(decoder_dir) for p in decoder_dir.rglob("*") if p.is_file())
    assert [n.as_posix() for n in names] == [
        "cosyvoice.yaml", "flow.pt", "hift.pt", "voices/en.npy", "voices/zh.npy",
    ]
    for name in names:
        assert (decoder_dir / name).read_bytes() == (again / name).read_bytes(), name
    data = read_cosyvoice_yaml(decoder_dir / "cosyvoice.yaml")
    assert FlowConfig.from_yaml(data["flow"]) == FlowConfig.tiny()
    assert HiFTConfig.from_yaml(data["hift"]) == TINY


def test_decoder_load_names_missing_files(tmp_path: Path, decoder_dir: Path) -> None:
    for missing in ("flow.pt", "hift.pt"):
        d = tmp_path / missing
        d.mkdir()
        for f in decoder_dir.iterdir():
            if f.is_file() and f.name != missing:
                (d / f.name).write_bytes(f.read_bytes())
        with pytest.raises(CheckpointError, match=f"missing file .*{missing}"):
            Cosy2Decoder.load(d)
    d = tmp_path / "no_yaml"  # official defaults then, which the tiny weights do not fit
    d.mkdir()
    for name in ("flow.pt", "hift.pt"):
        (d / name).write_bytes((decoder_dir / name).read_bytes())
    with pytest.raises(CheckpointError, match="shape mismatch"):
        Cosy2Decoder.load(d)


# ---- cosyvoice.yaml -------------------------------------------------------------------------------

OFFICIAL_STYLE_YAML = """\
__set_seed1: !apply:random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
sample_rate: 24000
spk_embed_dim: 192
token_frame_rate: 25
token_mel_ratio: 2
qwen_pretrain_path: ''
hop: 480
llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: 896
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: 512
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 512
        attention_heads: 8
        linear_units: 2048
        num_blocks: 6
        input_size: 512
        use_cnn_module: False
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !!python/object/apply:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                inference_cfg_rate: 0.7
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            causal: True
            channels: [256]
            attention_head_dim: 64
            n_blocks: 4
            num_mid_blocks: 12
            num_heads: 8
            act_fn: 'gelu'
hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 512
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 512
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    hop_size: !ref <hop>
    win_size: !ref <hop> * 4
    sampling_rate: !ref <sample_rate>
    fmax: 8000
    center: False
save_path: !ref <qwen_pretrain_path>/exp
"""


def test_yaml_reader_reads_numbers_without_building_objects(tmp_path: Path) -> None:
    path = tmp_path / "cosyvoice.yaml"
    path.write_text(OFFICIAL_STYLE_YAML)
    data = read_cosyvoice_yaml(path)
    assert data["__set_seed1"] == [1986]
    assert data["flow"]["spk_embed_dim"] == 192 and data["hift"]["sampling_rate"] == 24000
    assert data["flow"]["decoder"]["cfm_params"] == {
        "sigma_min": 1e-06, "solver": "euler", "t_scheduler": "cosine", "inference_cfg_rate": 0.7,
    }
    assert data["feat_extractor"]["win_size"] == 1920 and data["feat_extractor"]["hop_size"] == 480
    assert data["llm"]["llm"]["pretrain_path"] == "" and data["save_path"] == "/exp"
    assert FlowConfig.from_yaml(data["flow"]) == FlowConfig()
    assert HiFTConfig.from_yaml(data["hift"]) == HiFTConfig()


def test_yaml_reader_errors_name_the_file(tmp_path: Path) -> None:
    cases = {
        "bad_ref.yaml": "a: 1\nb: !ref <nope>\n",
        "cycle.yaml": "a: !ref <b>\nb: !ref <a>\n",
        "not_yaml.yaml": "a: [1, 2\n",
        "scalar.yaml": "just text\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(CheckpointError, match=name):
            read_cosyvoice_yaml(tmp_path / name)
    with pytest.raises(CheckpointError, match="missing file"):
        read_cosyvoice_yaml(tmp_path / "absent.yaml")
