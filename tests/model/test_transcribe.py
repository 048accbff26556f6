"""User transcripts from Whisper's text decoder on the tiny set: stepping equals openai-whisper's own
`whisper.decode` on the same encoder output (padded and unpadded rows, jobs interleaved), deltas join to
the text, and a missing or decoder-less file is a CheckpointError saying how to get one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import whisper
from whisper.decoding import DecodingOptions

from voice_agent.errors import CheckpointError
from voice_agent.model.speech_lm import SpeechLM
from voice_agent.model.tiny import make_tiny
from voice_agent.model.transcribe import Transcriber, TranscriptJob

RATE = 16_000
GREEDY = DecodingOptions(task="transcribe", temperature=0.0, without_timestamps=True, fp16=False)


def speechlike(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    x = sum(np.sin(2 * np.pi * (100 + 60 * rng.random()) * k * t) / k for k in range(1, 6))
    return (0.1 * x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def transcriber(tiny):
    return Transcriber.load(tiny.speech_encoder)


@pytest.fixture(scope="module")
def reference(tiny):
    """openai-whisper's own model loaded from the same file, its encoder an identity (the rows given are
    already encoded, at any length)."""
    model = whisper.load_model(str(tiny.speech_encoder), device="cpu")
    model.encoder = torch.nn.Identity()
    return model


def run(job: TranscriptJob) -> list[str]:
    deltas = []
    while not job.done:
        deltas.append(job.step())
    return deltas


def encoder_rows(tiny, audios: list[np.ndarray], unpadded: bool) -> list[torch.Tensor]:
    """Each row's real encoder frames, as the engine computes them (speech_features)."""
    lm = SpeechLM.load(tiny.model_dir, unpadded=unpadded)
    features = lm.speech_features(audios)
    k = lm.config.speech_encoder_ds_rate
    return [features.encoder_out[i, : features.lengths[i] * k] for i in range(len(audios))]


def test_padded_row_decodes_as_whisper_decode(tiny, transcriber, reference):
    (row,) = encoder_rows(tiny, [speechlike(1.5, seed=1)], unpadded=False)
    assert row.shape == (1500, 128)
    expected = whisper.decode(reference, row, GREEDY)
    job = transcriber.start(row)
    deltas = run(job)
    assert job.text == expected.text and job.language == expected.language
    assert "".join(deltas) == job.text and len(job.text) > 0
    # language detection, then one forward per sampled token (this random decoder never samples eot)
    assert job.steps == 1 + len(expected.tokens)
    again = transcriber.start(row)
    assert run(again) == deltas


def test_unpadded_rows_interleaved_decode_as_whisper_decode_each(tiny, transcriber, reference):
    rows = encoder_rows(tiny, [speechlike(0.7, seed=2), speechlike(2.3, seed=3)], unpadded=True)
    assert [r.shape[0] for r in rows] == [35, 115]  # mel frames // 2 of each row
    expected = [whisper.decode(reference, row, GREEDY).text for row in rows]
    assert expected[0] != expected[1]
    jobs = [transcriber.start(row) for row in rows]
    deltas: list[list[str]] = [[], []]
    while not all(job.done for job in jobs):  # the jobs share the decoder modules; their caches stay apart
        for i, job in enumerate(jobs):
            if not job.done:
                deltas[i].append(job.step())
    assert [job.text for job in jobs] == expected
    assert ["".join(d) for d in deltas] == expected


def test_a_given_language_skips_detection(tiny, reference):
    row = torch.randn(40, 128) * 0.5
    job = Transcriber.load(tiny.speech_encoder, language="fr").start(row)
    first = job.step()
    assert job.language == "fr" and job.tokens.shape[1] == 5  # sot, fr, transcribe, notimestamps, a token
    assert first + "".join(run(job)) == job.text == whisper.decode(reference, row, GREEDY, language="fr").text


class Script:
    """A logit filter that forces the decoder through `tokens` then eot (an extension point of
    openai-whisper's decoding, to test the text handling on chosen tokens)."""

    def __init__(self, tokens: list[int], sample_begin: int, eot: int) -> None:
        self.tokens, self.sample_begin, self.eot = tokens + [eot], sample_begin, eot

    def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        forced = self.tokens[tokens.shape[1] - self.sample_begin]
        logits[:] = -np.inf
        logits[:, forced] = 0.0


def test_deltas_hold_back_split_characters_and_edge_whitespace(tiny):
    transcriber = Transcriber.load(tiny.speech_encoder, language="en")
    tokenizer, task = transcriber.task.tokenizer, transcriber.task
    text = "  Grüße, 𝄞 日本語!  "
    tokens = tokenizer.encode(text)
    split = [t for t in tokens if not _is_whole(tokenizer.encoding.decode_single_token_bytes(t))]
    assert split, "expected a character spread over several tokens"
    task.logit_filters = [*task.logit_filters, Script(tokens, task.sample_begin, tokenizer.eot)]
    job = transcriber.start(torch.zeros(10, 128))
    deltas = run(job)
    assert job.text == text.strip() == "".join(deltas)
    assert all("\ufffd" not in d for d in deltas)
    assert not deltas[-1].endswith(" ") and all(d == d.rstrip() or i < len(deltas) - 1 for i, d in enumerate(deltas))
    assert "" in deltas  # a token ending inside a character shows nothing yet
    assert job.steps == len(tokens) + 1  # the last step sampled eot


def _is_whole(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_a_row_of_the_wrong_shape_is_refused(transcriber):
    for shape in [(1500,), (10, 64), (1501, 128), (0, 128)]:
        with pytest.raises(ValueError, match="expected \\(T, 128\\)"):
            transcriber.start(torch.zeros(shape))


def test_a_finished_job_refuses_more_steps(tiny):
    transcriber = Transcriber.load(tiny.speech_encoder, language="en")
    task = transcriber.task
    task.logit_filters = [*task.logit_filters, Script([], task.sample_begin + 0, task.tokenizer.eot)]
    task.logit_filters = [f for f in task.logit_filters if type(f).__name__ != "SuppressBlank"]
    job = transcriber.start(torch.zeros(10, 128))
    assert job.step() == "" and job.done and job.text == ""
    with pytest.raises(ValueError, match="after done"):
        job.step()


def test_missing_file_or_decoder_weights_say_how_to_get_them(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="missing file .*voice-agent download --whisper"):
        Transcriber.load(tmp_path / "large-v3.pt")
    data = torch.load(tiny.speech_encoder, weights_only=True)
    data["model_state_dict"] = {k: v for k, v in data["model_state_dict"].items() if k.startswith("encoder.")}
    torch.save(data, tmp_path / "encoder-only.pt")
    with pytest.raises(CheckpointError, match="no Whisper text decoder weights.*voice-agent download --whisper"):
        Transcriber.load(tmp_path / "encoder-only.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="malformed"):
        Transcriber.load(tmp_path / "junk.pt")


def test_the_decoder_is_loaded_alone_in_the_model_dtype(tiny):
    transcriber = Transcriber.load(tiny.speech_encoder, dtype=torch.bfloat16)
    names = {name for name, _ in transcriber.model.named_parameters()}
    assert names and all(name.startswith("decoder.") for name in names)  # no second audio encoder
    dtypes = {name: p.dtype for name, p in transcriber.model.named_parameters()}
    assert {d for name, d in dtypes.items() if "ln" not in name} == {torch.bfloat16}
    assert {d for name, d in dtypes.items() if "ln" in name} == {torch.float32}  # as whisper's LayerNorm wants
    job = transcriber.start(torch.randn(20, 128))  # a float32 row runs in the decoder's dtype
    job.step()
    job.step()
    assert job.features.dtype == torch.bfloat16


def test_a_random_decoder_for_benchmarks_runs_to_the_token_limit():
    from whisper.model import ModelDimensions

    from voice_agent.model.tiny import WHISPER_DIMS

    transcriber = Transcriber.random(ModelDimensions(**WHISPER_DIMS), seed=1)
    job = transcriber.start(torch.randn(30, 128))
    deltas = run(job)
    assert job.steps == 1 + WHISPER_DIMS["n_text_ctx"] // 2 and "".join(deltas) == job.text != ""
