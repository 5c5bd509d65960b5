"""A few bf16 training steps of each backbone on CUDA through `lstm_moe.train` itself: the LSTM
and Transformer language models and translation models, with MoE layers, train on the GPU
under bf16 autocast (the engine's default there), the experts in bf16 and the routers in
float32, with finite losses at every step; the saved run then evaluates on the GPU (test
perplexity, and beam search under bf16 for translation)."""

from __future__ import annotations

import math

import pytest
import torch

from eval.perplexity import main as perplexity_main
from eval.translate import main as translate_main
from lstm_moe.files import read_json
from lstm_moe.moe.experts import BatchedExperts
from lstm_moe.moe.routing import Router
from lstm_moe.train import main as train_main
from tests.cuda.device import needs_cuda
from tests.runs import read_metrics
from tests.switch.test_every_model import COMMON, MODELS

pytestmark = needs_cuda

STEPS = 6


@pytest.fixture
def dtypes_in_training(monkeypatch) -> dict[str, set]:
    """The dtypes every router's gates and every experts module's output take in training
    (validation runs in the weights' float32), recorded on the classes, so that they cover the
    models the command builds."""
    seen: dict[str, set] = {"gates": set(), "experts": set()}
    route, experts_forward = Router.forward, BatchedExperts.forward

    def router_forward(self, *args, **kwargs):
        routing = route(self, *args, **kwargs)
        if self.training:
            seen["gates"].add(routing.gates.dtype)
        return routing

    def recorded_experts(self, *args, **kwargs):
        out = experts_forward(self, *args, **kwargs)
        if self.training:
            seen["experts"].add(out.dtype)
        return out

    monkeypatch.setattr(Router, "forward", router_forward)
    monkeypatch.setattr(BatchedExperts, "forward", recorded_experts)
    return seen


@pytest.mark.parametrize("family", list(MODELS))
def test_each_backbone_trains_in_bf16_on_cuda(
    family, tiny_dataset, parallel_dataset, tmp_path, capsys, dtypes_in_training
):
    data = parallel_dataset if family.endswith("nmt") else tiny_dataset
    run = tmp_path / "run"
    argv = ["--data", str(data), "--run", str(run), *MODELS[family], *COMMON,
            "--device=cuda", "--bf16=true", f"--max_steps={STEPS}"]  # fmt: skip
    assert train_main(argv) == 0
    assert " on cuda" in capsys.readouterr().err
    assert read_json(run / "config.json")["train"]["bf16"] is True

    train = read_metrics(run)
    assert [e["step"] for e in train] == list(range(1, STEPS + 1))
    for entry in train:
        for key in ("loss", "aux_loss", "grad_norm"):
            assert math.isfinite(entry[key]), (entry["step"], key, entry[key])
    assert all(math.isfinite(e["valid_nll"]) for e in read_metrics(run, "valid"))
    assert dtypes_in_training == {"gates": {torch.float32}, "experts": {torch.bfloat16}}

    assert perplexity_main([str(run), "--device", "cuda"]) == 0
    assert math.isfinite(read_json(run / "eval" / "perplexity.json")["perplexity"])
    if family.endswith("nmt"):
        argv = [str(run), "--device", "cuda", "--bf16", "--limit=8", "--beam=2", "--quiet"]
        assert translate_main(argv) == 0
        hypotheses = (run / "eval" / "test.hyp.de").read_text(encoding="utf-8").splitlines()
        assert len(hypotheses) == 8
        assert read_json(run / "eval" / "translate-test.json")["device"].startswith("cuda")
