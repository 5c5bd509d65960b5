"""Attention experts (Switch App. A, Figure 10, Table 10): the self-attention's Q/K/V projection
routed to linear experts (lstm_moe.moe.MoEProjection, BatchedLinearExperts) against a slow
per-token reference, its gradients, causal masking, incremental decoding, float32 under
autocast, the expert tensors' marking, the model's aux losses, stats and ops, and 2 gloo
ranks against one process."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.multiprocessing as mp
from torch.func import functional_call

from eval.perplexity import main as perplexity_main
from eval.translate import main as translate_main
from lstm_moe.fields import apply_overrides
from lstm_moe.files import read_json
from lstm_moe.moe import BatchedLinearExperts, MoEConfig, MoEProjection, expert_tensor_names
from lstm_moe.tasks.common import routing_stats
from lstm_moe.train import main as train_main
from switch.config import TransformerLMConfig, TransformerNMTConfig
from switch.presets import TRANSFORMER_LM_PRESETS
from switch.transformer import TransformerLM, TransformerTranslationModel
from tests.ranks import free_port, no_noise, run_commands
from tests.runs import assert_same_metrics, read_metrics

VOCAB, D, E = 30, 16, 4
# Dropless, so that no token's projection depends on which other tokens claimed an expert's
# capacity first (a capacity couples the sequences of a batch: see the README).
ROUTERS = {"switch": dict(k=1), "noisy_topk": dict(k=2)}


def moe(router: str = "switch", **options) -> MoEConfig:
    return MoEConfig(
        d_model=D, n_experts=E, expert_hidden=32, router=router, **{**ROUTERS[router], **options}
    )


def lm(router: str = "switch", **fields) -> TransformerLM:
    fields = {"moe_layers": (1,), "attention_moe_layers": (0, 1), **fields}
    config = TransformerLMConfig(
        vocab_size=VOCAB, d_model=D, n_layers=2, n_heads=2, ffn_hidden=32, moe=moe(router),
        dropout=0.0, **fields,
    )  # fmt: skip
    return TransformerLM(config)


def nmt(router: str = "switch", **fields) -> TransformerTranslationModel:
    fields = {"encoder_attention_moe_layers": (0,), "decoder_attention_moe_layers": (0, 1),
              **fields}  # fmt: skip
    config = TransformerNMTConfig(
        vocab_size=VOCAB, d_model=D, encoder_layers=2, decoder_layers=2, n_heads=2,
        ffn_hidden=32, moe=moe(router), encoder_moe_layers=(1,), decoder_moe_layers=(0,),
        dropout=0.0, **fields,
    )  # fmt: skip
    return TransformerTranslationModel(config)


def reference_projection(projection: MoEProjection, x: torch.Tensor) -> torch.Tensor:
    """Σ_slot gate · x_t·W[expert], token by token and slot by slot (a routing drawn again:
    in evaluation mode the routers draw nothing, so it is the same one)."""
    tokens = x.reshape(-1, x.shape[-1])  # [T, D]
    routing = projection.router(tokens)
    weight = projection.experts.weight  # [E, D, D']
    out = tokens.new_zeros(tokens.shape[0], weight.shape[-1])
    for t in range(tokens.shape[0]):
        for slot in range(routing.expert_index.shape[1]):
            expert = int(routing.expert_index[t, slot])
            if expert >= 0:
                out[t] += routing.gates[t, slot] * (tokens[t] @ weight[expert])
    return out.view(*x.shape[:-1], -1)


# ----------------------------------------------------------------------------- the projection


@pytest.mark.parametrize("router", list(ROUTERS))
def test_the_projection_equals_a_per_token_reference_in_float64(router):
    torch.manual_seed(0)
    projection = MoEProjection(moe(router), 3 * D).double().eval()
    x = torch.randn(3, 7, D, dtype=torch.float64)
    with torch.no_grad():
        got = projection(x)
        want = reference_projection(projection, x)
    assert got.output.shape == (3, 7, 3 * D)
    torch.testing.assert_close(got.output, want, rtol=1e-12, atol=1e-12)
    experts_per_token = ROUTERS[router]["k"]
    assert int(got.stats.tokens_per_expert.sum()) == 21 * experts_per_token


def test_masked_tokens_are_routed_nowhere_and_project_to_zero():
    torch.manual_seed(1)
    projection = MoEProjection(moe(), 3 * D).eval()
    x = torch.randn(2, 5, D)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        out = projection(x, mask)
        alone = projection(x[1:, :3])
    assert (out.output[1, 3:] == 0).all()
    torch.testing.assert_close(out.output[1, :3], alone.output[0], rtol=1e-6, atol=1e-6)
    assert int(out.stats.tokens_per_expert.sum()) == int(mask.sum())


def test_gradients_of_input_experts_and_router_by_gradcheck():
    torch.manual_seed(2)
    config = MoEConfig(d_model=3, n_experts=3, expert_hidden=1, k=1, router="switch")
    projection = MoEProjection(config, 5).double().eval()
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    weight = projection.experts.weight.detach().clone().requires_grad_(True)
    w_router = projection.router.w_router.detach().clone().requires_grad_(True)

    def project(x, weight, w_router):
        params = {"experts.weight": weight, "router.w_router": w_router}
        result = functional_call(projection, params, (x,))
        return result.output, result.aux_loss

    assert torch.autograd.gradcheck(project, (x, weight, w_router))


def test_a_shard_of_experts_holds_what_one_process_draws():
    for init in ("uniform", "trunc_normal"):
        torch.manual_seed(3)
        full = BatchedLinearExperts(4, 8, 24, init=init)
        after_full = torch.rand(1)
        torch.manual_seed(3)
        shard = BatchedLinearExperts(4, 8, 24, (2, 4), init=init)
        after_shard = torch.rand(1)
        torch.testing.assert_close(shard.weight, full.weight[2:], rtol=0, atol=0)
        assert after_shard == after_full  # one global draw, whatever the shard
    weight = BatchedLinearExperts(8, 256, 64, init="uniform").weight
    assert weight.abs().max() <= 1 / 16  # ±1/√D, as nn.Linear draws the dense projection
    weight = BatchedLinearExperts(8, 256, 64, init="trunc_normal", init_scale=0.1).weight
    assert weight.std().item() == pytest.approx((0.1 / 256) ** 0.5, rel=0.05)


def test_the_product_keeps_float32_under_autocast_unless_told_otherwise():
    torch.manual_seed(4)
    projection = MoEProjection(moe(), 3 * D).eval()
    x = torch.randn(2, 6, D)
    rows, counts = x.reshape(-1, D), torch.tensor([3, 3, 3, 3])
    with torch.no_grad():
        exact = projection(x).output
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kept = projection(x).output
            assert projection.experts(rows, counts).dtype == torch.float32
            projection.experts.float32 = False
            low = projection(x).output
            assert projection.experts(rows, counts).dtype == torch.bfloat16
    assert kept.dtype == torch.float32
    torch.testing.assert_close(kept, exact, rtol=1e-6, atol=1e-6)
    assert (low.float() - exact).abs().max() > 1e-4  # bfloat16's rounding shows


# ----------------------------------------------------------------------------- in the models


@pytest.mark.parametrize("router", list(ROUTERS))
def test_the_lm_output_at_t_ignores_the_tokens_after_t(router):
    """In float64 to 1e-12, not bit for bit: the expert GEMMs' blocking follows the number of
    rows each expert gets, which later tokens change (a leak would be of order 1e-3)."""
    torch.manual_seed(5)
    model = lm(router).double().eval()
    ids = torch.randint(VOCAB, (12, 3))  # [T, B]
    changed = ids.clone()
    changed[7:] = (changed[7:] + 1 + torch.randint(VOCAB - 1, changed[7:].shape)) % VOCAB
    with torch.no_grad():
        before, after = model(ids).hidden, model(changed).hidden
    torch.testing.assert_close(after[:7], before[:7], rtol=0, atol=1e-12)
    assert (after[7:] - before[7:]).abs().amax() > 1e-3


@pytest.mark.parametrize("router", list(ROUTERS))
def test_incremental_decoding_equals_full_recomputation(router):
    torch.manual_seed(6)
    model = nmt(router).eval()
    src = torch.randint(3, VOCAB, (9, 3))  # [S, B]
    src_mask = torch.ones(9, 3, dtype=torch.bool)
    src_mask[6:, 1] = False
    tgt = torch.randint(3, VOCAB, (7, 3))  # [T, B]
    with torch.no_grad():
        out = model(src, src_mask, tgt, torch.ones(7, 3, dtype=torch.bool))
        full = torch.log_softmax(model.softmax.logits(out.hidden.reshape(-1, D)), -1)
        full = full.view(7, 3, VOCAB)
        state = model.start_decoding(src.t(), src_mask.t())
        for t in range(7):
            step = model.decode_step(tgt[t], state)
            torch.testing.assert_close(step.log_probs, full[t], rtol=1e-5, atol=1e-5)
            state = step.state
        none = model.decode_step(torch.zeros(0, dtype=torch.long), model.select_rows(state, []))
    assert none.log_probs.shape == (0, VOCAB)


def test_the_models_projection_is_float32_under_autocast():
    torch.manual_seed(7)
    model = lm(attention_moe_layers=(1,)).eval()
    dtypes = {}

    def record(name):
        def hook(module, args, output):
            output = getattr(output, "output", output)
            dtypes[name] = output.dtype

        return hook

    for index, layer in enumerate(model.layers):
        layer.attention.qkv.register_forward_hook(record(index))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(VOCAB, (6, 2)))
    assert dtypes == {0: torch.bfloat16, 1: torch.float32}  # dense layer 0, experts in 1


def test_the_attention_experts_are_expert_tensors_and_their_losses_and_stats_count():
    torch.manual_seed(8)
    model = lm().train()
    names = expert_tensor_names(model)
    assert {"layers.0.attention.qkv.experts.weight", "layers.1.attention.qkv.experts.weight"} <= (
        names
    )
    assert "layers.1.ffn.moe.experts.w_in" in names
    assert not any("attention.out" in n or "router" in n for n in names)
    ids = torch.randint(VOCAB, (8, 2))
    mask = torch.ones(8, 2, dtype=torch.bool)
    mask[5:, 1] = False
    out = model(ids, mask=mask)
    # Layer 0's attention, layer 1's attention, layer 1's feed-forward.
    assert len(out.moe) == 3
    torch.testing.assert_close(out.aux_loss, sum(r.aux_loss for r in out.moe))
    assert all(int(r.stats.tokens_per_expert.sum()) == int(mask.sum()) for r in out.moe)
    assert {"moe0_balance", "moe1_cv_load", "moe2_fraction_dropped"} <= set(routing_stats(out.moe))
    (model.nll(out.hidden, ids).mean() + out.aux_loss).backward()
    for layer in model.layers:
        assert layer.attention.qkv.experts.weight.grad.abs().sum() > 0
        assert layer.attention.qkv.router.w_router.grad.abs().sum() > 0
    encoder_decoder = nmt()
    names = expert_tensor_names(encoder_decoder)
    assert "encoder.0.attention.qkv.experts.weight" in names
    assert "decoder.1.attention.qkv.experts.weight" in names
    assert not any(".cross." in n for n in names)  # cross-attention stays dense


def test_ops_and_parameters_of_attention_experts():
    """Top-1: the dense Q/K/V's D·3D multiply-adds plus the gating D·E per layer; E - 1 more
    [D, 3D] matrices and the router's [D, E]."""
    dense, routed = lm(attention_moe_layers=()), lm(attention_moe_layers=(0, 1))
    assert routed.ops_per_timestep() - dense.ops_per_timestep() == 2 * D * E
    assert routed.total_params() - dense.total_params() == 2 * ((E - 1) * 3 * D * D + D * E)
    dense, routed = nmt(decoder_attention_moe_layers=()), nmt()
    ops, ops_dense = routed.ops_per_timestep(), dense.ops_per_timestep()
    assert ops["encoder"] - ops_dense["encoder"] == 0  # the encoder's layer 0 in both
    assert ops["decoder"] - ops_dense["decoder"] == 2 * D * E
    preset = TRANSFORMER_LM_PRESETS["switch-32-attn"]
    assert preset == dataclasses.replace(
        TRANSFORMER_LM_PRESETS["switch-32"], attention_moe_layers=(1, 3)
    )


def test_the_layers_are_listed_explicitly_and_checked():
    with pytest.raises(ValueError, match="attention_moe_layers"):
        TransformerLMConfig(n_layers=4, moe_layers=(), attention_moe_layers=(4,))
    with pytest.raises(ValueError, match="decoder_attention_moe_layers"):
        TransformerNMTConfig(
            encoder_layers=2, decoder_layers=2, encoder_moe_layers=(), decoder_moe_layers=(),
            decoder_attention_moe_layers=(1, 1),
        )  # fmt: skip
    config = apply_overrides(TRANSFORMER_LM_PRESETS["switch-8"], {"attention_moe_layers": "1,3"})
    assert config.attention_moe_layers == (1, 3) and config.attention_moe_float32
    config = apply_overrides(config, {"attention_moe_float32": "false"})
    assert not config.attention_moe_float32
    layers = lm(attention_moe_layers=(1,)).layers
    assert [type(layer.attention.qkv).__name__ for layer in layers] == ["Linear", "MoEProjection"]


# ----------------------------------------------------------------------------- command line

COMMON = ["--d_model=16", "--n_heads=2", "--ffn_hidden=16", "--n_experts=4",
          "--expert_hidden=16", "--dropout=0.0", "--lr=0.01", "--warmup_steps=2",
          "--log_every=1", "--batch_size=8", "--quiet"]  # fmt: skip
LM = ["--preset", "switch-32-attn", "--softmax=full", "--bptt=10", "--eval_tokens=200",
      "--capacity_factor=0.75", "--jitter_eps=0", "--max_steps=4", "--eval_every=2",
      "--checkpoint_every=2", *COMMON]  # fmt: skip


@pytest.mark.distributed
def test_an_lm_with_attention_experts_on_two_ranks_trains_like_one_process(tiny_dataset, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    argv = ["--data", str(tiny_dataset), *LM]
    with no_noise():
        assert train_main([*argv, "--run", str(one)]) == 0
    commands = [("lstm_moe.train", [*argv, "--run", str(two)])]
    mp.spawn(run_commands, args=(2, free_port(), commands), nprocs=2, join=True)
    assert_same_metrics(two, one, range(1, 5), train_keys=None, valid_keys=None)
    last = read_metrics(one)[-1]
    # moe0, moe2: the attention experts of layers 1 and 3; moe1, moe3 their feed-forward.
    assert last["moe0_fraction_dropped"] > 0 and "moe3_balance" in last
    assert perplexity_main([str(two)]) == 0  # the experts reassembled from both ranks
    assert perplexity_main([str(one)]) == 0
    scores = [read_json(run / "eval" / "perplexity.json")["perplexity"] for run in (one, two)]
    assert scores[1] == pytest.approx(scores[0], rel=1e-5)


def test_a_translation_model_with_attention_experts_trains_and_translates(
    parallel_dataset, tmp_path
):
    run = tmp_path / "nmt"
    argv = ["--data", str(parallel_dataset), "--run", str(run), "--preset", "NMT-switch-8",
            "--encoder_attention_moe_layers=0", "--decoder_attention_moe_layers=1",
            "--eval_pairs=20", "--max_steps=2", "--eval_every=2", *COMMON]  # fmt: skip
    assert train_main(argv) == 0
    assert read_json(run / "config.json")["model"]["decoder_attention_moe_layers"] == [1]
    assert translate_main([str(run), "--quiet", "--limit=4", "--beam=2"]) == 0
    assert (run / "eval" / "bleu.json").is_file()


def test_the_report_marks_the_layers_with_attention_experts():
    from eval.report import _transformer_stack

    assert _transformer_stack(4, [1, 3], [1, 3]) == "ffn-moe+qkv-ffn-moe+qkv"
    assert _transformer_stack(2, [], [0]) == "ffn+qkv-ffn"
    assert _transformer_stack(2, [1]) == "ffn-moe"  # a run saved before the option
