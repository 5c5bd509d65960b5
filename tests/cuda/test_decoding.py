"""Beam search on CUDA decodes what it decodes on the CPU: a tiny LSTM translation model and a
tiny Transformer one, with MoE layers, the same weights on both devices, give the same
hypotheses and scores. The models run in float64 (their softmax in float32), and their output
layer is scaled up so that the next-token distributions are peaked: the two devices' rounding
then never decides between two candidates. Under bf16 autocast on CUDA, every translation is
still a valid one."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from eval.beam_search import MAX_LEN_A, MAX_LEN_B, translate_ids
from lstm_moe.files import EOS_ID
from lstm_moe.nmt import TranslationModel
from tests.cuda.device import CUDA, needs_cuda
from tests.switch.test_transformer import VOCAB as TRANSFORMER_VOCAB
from tests.switch.test_transformer import nmt as tiny_transformer
from tests.translation.test_nmt import V as LSTM_VOCAB
from tests.translation.test_nmt import tiny_config

pytestmark = needs_cuda

CPU = torch.device("cpu")
OPTIONS = dict(beam=3, batch_size=4, progress=False)


def tiny_model(family: str) -> tuple[torch.nn.Module, int]:
    """The translation tests' tiny model of a family, in evaluation mode, and its vocabulary.
    The 2017 gates start at zero, every expert tied with every other, and the two devices'
    top-k may break such ties differently: they are drawn at random here."""
    torch.manual_seed(0)
    if family == "lstm":
        model, vocab = TranslationModel(tiny_config()), LSTM_VOCAB
    else:
        model, vocab = tiny_transformer("switch"), TRANSFORMER_VOCAB
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("router.w_gate"):
                parameter.normal_()
    return model.eval(), vocab


def sources(vocab: int, n: int = 10, seed: int = 0) -> list[np.ndarray]:
    """n sources of 2 to 9 word pieces ending in EOS, as eval.translate reads them."""
    rng = np.random.default_rng(seed)
    return [
        np.append(rng.integers(3, vocab, size=int(rng.integers(2, 10))), EOS_ID) for _ in range(n)
    ]


@pytest.mark.parametrize("family", ["lstm", "transformer"])
def test_cuda_decodes_what_the_cpu_decodes(family):
    model, vocab = tiny_model(family)
    model = model.double()
    with torch.no_grad():
        model.softmax.weight.mul_(20.0)
    batch = sources(vocab)
    on_cpu = translate_ids(model, batch, CPU, **OPTIONS)
    on_cuda = translate_ids(copy.deepcopy(model).to(CUDA), batch, CUDA, **OPTIONS)
    assert [t.tokens for t in on_cuda] == [t.tokens for t in on_cpu]
    assert [t.score for t in on_cuda] == pytest.approx([t.score for t in on_cpu], rel=1e-4)
    assert any(t.tokens for t in on_cpu)


@pytest.mark.parametrize("family", ["lstm", "transformer"])
def test_decoding_under_bf16_autocast_gives_valid_translations(family):
    model, vocab = tiny_model(family)
    batch = sources(vocab, seed=1)
    with torch.autocast("cuda", torch.bfloat16):
        translations = translate_ids(model.to(CUDA), batch, CUDA, **OPTIONS)
    assert len(translations) == len(batch)
    for source, translation in zip(batch, translations, strict=True):
        tokens = translation.tokens
        assert 1 <= len(tokens) <= math.floor(MAX_LEN_A * len(source) + MAX_LEN_B)
        assert all(0 <= t < vocab for t in tokens) and EOS_ID not in tokens
        assert math.isfinite(translation.score)
