"""eval.experts: the mutual information of topic and expert on hand-computed joints, the counting
of top tokens on a constructed routing, the row order of every model family's MoE layers (a
router whose choice is a known function of the token), and the command end to end on tiny
trained runs of the generated corpora (topics known) and of a corpus without topics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from data_prep.synthetic import PRESETS as LM_PRESETS
from data_prep.synthetic import prepare_synthetic
from data_prep.synthetic_parallel import PRESETS as PARALLEL_PRESETS
from data_prep.synthetic_parallel import prepare_synthetic_parallel
from eval import experts
from eval.expert_routing import lm_routing, lm_tokens, pair_routing, pair_tokens
from eval.experts import (
    markdown_section,
    max_mutual_information_bits,
    mutual_information_bits,
    pair_weights,
    top_counts,
    topic_expert_counts,
    topic_order,
)
from lstm_moe.config import LMConfig, NMTConfig
from lstm_moe.lm import LanguageModel
from lstm_moe.moe import MoEConfig, MoELayer, MoEProjection
from lstm_moe.nmt import TranslationModel
from lstm_moe.pairs import PairSplit, read_pairs
from lstm_moe.train import main as train_main
from switch.config import TransformerLMConfig, TransformerNMTConfig
from switch.transformer import TransformerLM, TransformerTranslationModel

# ----------------------------------------------------------------------------- the measures


def test_independent_routing_has_zero_bits():
    topics = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    experts_ = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625], dtype=torch.float64)
    joint = 1000 * torch.outer(topics, experts_)  # p(t, e) = p(t) p(e)
    assert mutual_information_bits(joint) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information_bits(torch.zeros(3, 4)) == 0.0  # nothing routed


@pytest.mark.parametrize("n_experts", [2, 4, 8])
def test_one_topic_per_expert_reaches_log2_e(n_experts):
    joint = 7.0 * torch.eye(n_experts)  # topic t always goes to expert t
    bits = mutual_information_bits(joint)
    assert bits == pytest.approx(math.log2(n_experts), abs=1e-12)
    assert bits == pytest.approx(max_mutual_information_bits(n_experts, n_experts))


def test_a_hand_computed_intermediate_case():
    # p = [[1/4, 1/4], [0, 1/2]]: p(t) = (1/2, 1/2), p(e) = (1/4, 3/4).
    # I = H(E) - H(E | T) = (1/4 log2 4 + 3/4 log2 4/3) - (1/2 · 1 + 1/2 · 0)
    #   = 1/2 + 3/4 log2(4/3) - 1/2 = 0.311278...
    joint = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    expected = 0.75 * math.log2(4 / 3)
    assert mutual_information_bits(joint) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.311278, abs=1e-6)
    assert max_mutual_information_bits(2, 2) == 1.0
    assert max_mutual_information_bits(64, 8) == 3.0  # min(log2 #topics, log2 E)
    with pytest.raises(ValueError, match=">= 0"):
        mutual_information_bits(torch.tensor([[1.0, -1.0]]))


def test_each_token_weighs_one_whatever_its_number_of_pairs():
    # Token 0 (topic 1) goes to experts 0 and 2 (top-2), token 1 (topic 0) to expert 1 only,
    # token 2 (topic 1) to experts 2 and 3.
    token = np.array([0, 0, 1, 2, 2])
    expert = np.array([0, 2, 1, 2, 3])
    topic = np.array([1, 1, 0, 1, 1])
    weight = pair_weights(token)
    np.testing.assert_allclose(weight, [0.5, 0.5, 1.0, 0.5, 0.5])
    joint = topic_expert_counts(topic, expert, weight, n_topics=2, n_experts=4)
    np.testing.assert_allclose(joint, [[0, 1, 0, 0], [0.5, 0, 1, 0.5]])
    assert joint.sum() == 3  # three tokens
    # Two topics, each token's weight split over its k = 2 experts, one of them shared by
    # both topics: p = [[1/4, 1/4, 0], [0, 1/4, 1/4]], I = H(E) - H(E | T) = 1.5 - 1 = 0.5.
    spread = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    assert mutual_information_bits(spread) == pytest.approx(0.5, abs=1e-12)


def test_top_counts_on_a_constructed_routing():
    # expert 0 sees tokens 5, 5, 7, 5, 9, 7; expert 1 sees 9; expert 2 nothing.
    expert = np.array([0, 0, 1, 0, 0, 0, 0])
    ids = np.array([5, 5, 9, 7, 5, 9, 7])
    found = top_counts(expert, ids[:, None], n_experts=3, top=2)
    assert found == [[((5,), 3), ((7,), 2)], [((9,), 1)], []]
    # Ties go to the smaller key; contexts are keys of several ids.
    context = np.array([[1, 5, 2], [1, 5, 2], [-1, 9, 3], [0, 5, 2], [0, 5, 2], [4, 4, 4]])
    found = top_counts(np.array([1, 1, 1, 1, 1, 1]), context, n_experts=2, top=3)
    assert found[1] == [((0, 5, 2), 2), ((1, 5, 2), 2), ((-1, 9, 3), 1)]


def test_topics_are_sorted_by_their_top_expert():
    joint = np.array([[0, 1, 9], [8, 2, 0], [1, 9, 0], [6, 0, 4]], dtype=float)
    # Top experts 2, 0, 1, 0 (shares 0.9, 0.8, 0.9, 0.6): expert 0's topics first, the
    # larger share first.
    assert topic_order(joint).tolist() == [1, 3, 2, 0]


def test_lm_tokens_topics_and_contexts_by_hand():
    # ids: sentence 0 = (5 6 </S>), sentence 1 = (7 </S>); the model reads </S> 5 6 </S> 7.
    table = lm_tokens(np.array([5, 6, 1, 7, 1]), np.array([3, 4]))
    assert table.ids.tolist() == [1, 5, 6, 1, 7]
    assert table.topic.tolist() == [3, 3, 3, 3, 4]  # the </S> ending sentence 0 is its own
    assert table.left.tolist() == [-1, -1, 5, 6, -1]
    assert table.right.tolist() == [-1, 6, 1, -1, -1]


def test_pair_tokens_by_hand():
    # Pair 0: source (4 5 </S>), target (6 </S>); pair 1: source (7 </S>), target (8 9 </S>).
    split = PairSplit(
        src=np.array([4, 5, 1, 7, 1]),
        tgt=np.array([6, 1, 8, 9, 1]),
        offsets=np.array([[0, 0], [3, 2], [5, 5]]),
    )
    tables = pair_tokens(split, 2, np.array([2, 0]))
    assert tables["encoder"].ids.tolist() == [4, 5, 1, 7, 1]
    assert tables["encoder"].topic.tolist() == [2, 2, 2, 0, 0]
    assert tables["encoder"].left.tolist() == [-1, 4, 5, -1, 7]
    assert tables["encoder"].right.tolist() == [5, 1, -1, 1, -1]
    assert tables["decoder"].ids.tolist() == [0, 6, 0, 8, 9]  # BOS, then the target
    assert tables["decoder"].topic.tolist() == [2, 2, 0, 0, 0]


# ----------------------------------------------------------------------------- the row order

E, D, V = 4, 8, 13
MOE = MoEConfig(d_model=D, n_experts=E, expert_hidden=4, k=1, router="noisy_topk")


def route_by_token(model: nn.Module) -> nn.Module:
    """Make every MoE layer's choice a function of the token it sees: expert = id mod E.

    Every weight but the LayerNorms' is zeroed, so an LSTM or an attention adds exactly 0 and
    an MoE layer's input is the embedding (plus constants and positions far smaller than it);
    each embedding is 100·onehot(id mod E), and each router's W_g = [I_E; 0] reads those E
    dimensions (no noise in evaluation)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.zero_()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                ids = torch.arange(module.num_embeddings)
                module.weight[ids, ids % E] = 100.0
            if isinstance(module, (MoELayer, MoEProjection)):
                module.router.w_gate.copy_(torch.eye(D, E))
    return model.eval()


LM_MODELS = {
    "lstm": lambda: LanguageModel(
        LMConfig(V, ("lstm", "moe", "lstm"), D, D, MOE, dropout=0.0, softmax="full")
    ),
    "transformer": lambda: TransformerLM(
        TransformerLMConfig(
            V, D, 2, 2, 8, moe=MOE, moe_layers=(1,), attention_moe_layers=(0,), dropout=0.0
        )
    ),
}


@pytest.mark.parametrize("arch", list(LM_MODELS))
def test_lm_rows_map_to_their_tokens(arch):
    torch.manual_seed(0)
    model = route_by_token(LM_MODELS[arch]())
    rng = np.random.default_rng(0)
    ids = rng.integers(3, V, size=29)
    ids[[4, 11, 12, 20, 28]] = 1  # sentences end with </S>
    # 3 lanes of 10 positions, windows of 4: the last window is short and the last lane
    # padded (29 of 30 positions real).
    layers = lm_routing(model, ids, torch.device("cpu"), batch_size=3, bptt=4)
    table = lm_tokens(ids, None)
    assert len(layers) == (2 if arch == "transformer" else 1)
    for layer in layers:
        token, expert = layer.pairs()
        assert sorted(token.tolist()) == list(range(len(ids)))  # every real position once
        np.testing.assert_array_equal(expert, table.ids[token] % E)
    if arch == "transformer":  # the attention experts' projection first, as in out.moe
        assert [layer.name for layer in layers] == ["layers.0.attention.qkv", "layers.1.ffn.moe"]


NMT_MODELS = {
    "lstm": lambda: TranslationModel(
        NMTConfig(V, ("lstm", "moe"), ("lstm", "moe"), D, D, MOE, attention_hidden=D, dropout=0.0)
    ),
    "transformer": lambda: TransformerTranslationModel(
        TransformerNMTConfig(
            V, D, 2, 2, 2, 8, moe=MOE, encoder_moe_layers=(1,), decoder_moe_layers=(0,), dropout=0.0
        )
    ),
}


@pytest.mark.parametrize("arch", list(NMT_MODELS))
def test_translation_rows_map_to_their_tokens(arch):
    torch.manual_seed(0)
    model = route_by_token(NMT_MODELS[arch]())
    rng = np.random.default_rng(1)
    lengths = [(4, 3), (2, 5), (6, 2), (3, 3), (5, 4)]  # (source, target), EOS included
    src, tgt = [], []
    for s, t in lengths:
        src += [*rng.integers(3, V, size=s - 1).tolist(), 1]
        tgt += [*rng.integers(3, V, size=t - 1).tolist(), 1]
    offsets = np.cumsum([[0, 0], *lengths], axis=0)
    split = PairSplit(np.array(src), np.array(tgt), offsets)
    layers = pair_routing(model, split, 4, torch.device("cpu"), batch_size=3)  # padded batches
    tables = pair_tokens(split, 4, None)
    assert [layer.side for layer in layers] == ["encoder", "decoder"]
    for layer in layers:
        token, expert = layer.pairs()
        assert sorted(token.tolist()) == list(range(len(tables[layer.side].ids)))
        np.testing.assert_array_equal(expert, tables[layer.side].ids[token] % E)


# ----------------------------------------------------------------------------- end to end

TINY_RUN = ["--d_model=16", "--n_experts=4",
            "--expert_hidden=16", "--dropout=0.0", "--lr=0.01", "--warmup_steps=2",
            "--max_steps=4", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts-lm")
    data = prepare_synthetic(LM_PRESETS["tiny"], root / "data")
    run = root / "run"
    argv = ["--data", str(data), "--run", str(run), "--preset", "MoE-32", "--batch_size=8",
            "--bptt=10", "--eval_tokens=100", "--k=2", "--lstm_hidden=16", "--softmax=full",
            *TINY_RUN]  # fmt: skip
    assert train_main(argv) == 0
    return run


def test_end_to_end_on_the_generated_lm_corpus(lm_run, capsys):
    assert experts.main([str(lm_run), "--top=3", "--device=cpu"]) == 0  # the whole split
    out = capsys.readouterr().out
    assert "I(topic; expert) = " in out and f"wrote {lm_run / 'eval' / 'experts.json'}" in out
    result = json.loads((lm_run / "eval" / "experts.json").read_text())
    n = 1001  # the tiny preset's test tokens
    assert result["topics_available"] and result["tokens"] == n
    (layer,) = result["layers"]
    assert layer["n_experts"] == 4 and layer["experts_per_token"] == 2
    assert layer["tokens"] == n and layer["pairs"] == 2 * n == sum(layer["load"])
    for entry in layer["experts"]:
        assert len(entry["top_tokens"]) <= 3
        counts = [count for _, count in entry["top_tokens"]]
        assert counts == sorted(counts, reverse=True) and sum(counts) <= entry["load"]
        assert all(word == "</S>" or word.startswith("w") for word, _ in entry["top_tokens"])
    topics = layer["topics"]
    assert topics["n_topics"] == 4 and topics["max_bits"] == 2.0
    assert 0 <= topics["mi_bits"] <= 2.0
    assert topics["mi_fraction"] == pytest.approx(topics["mi_bits"] / 2.0)
    joint = torch.tensor(topics["joint_counts"])
    assert float(joint.sum()) == pytest.approx(n)  # one unit per token
    assert mutual_information_bits(joint) == pytest.approx(topics["mi_bits"])
    png = lm_run / "eval" / "experts-topics-layer0.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The report's section: a table, the MI line, the heat map's link.
    text = markdown_section(result, "moe", "runs/moe/eval/")
    assert "| expert | load | most routed tokens |" in text
    assert f"I(topic; expert) = **{topics['mi_bits']:.3f} bits**" in text
    assert "(runs/moe/eval/experts-topics-layer0.png)" in text
    # Without heat maps: the same numbers, no map written and none linked.
    png.unlink()
    assert experts.main([str(lm_run), "--top=3", "--device=cpu", "--no_heatmaps"]) == 0
    assert not png.exists()
    result = json.loads((lm_run / "eval" / "experts.json").read_text())
    assert result["layers"][0]["topics"]["heatmap"] is None
    text = markdown_section(result, "moe", "runs/moe/eval/")
    assert f"I(topic; expert) = **{topics['mi_bits']:.3f} bits**" in text and ".png" not in text


def test_analyse_run_is_deterministic(lm_run):
    a = experts.analyse_run(lm_run, max_tokens=300, top=2, device="cpu")
    b = experts.analyse_run(lm_run, max_tokens=300, top=2, device="cpu")
    a.pop("seconds"), b.pop("seconds")
    assert a == b


def test_translation_end_to_end_with_source_contexts(tmp_path, capsys):
    data = prepare_synthetic_parallel(PARALLEL_PRESETS["tiny"], tmp_path / "data", progress=False)
    run = tmp_path / "run"
    # The Transformer: the LSTM model's input feeding steps through the targets one by one,
    # several times slower (the row order of both is checked above).
    argv = ["--task", "translation", "--data", str(data), "--run", str(run), "--preset",
            "NMT-switch-8", "--n_heads=2", "--ffn_hidden=16", "--batch_size=8",
            "--eval_pairs=8", *TINY_RUN]  # fmt: skip
    assert train_main(argv) == 0
    capsys.readouterr()
    assert experts.main([str(run), "--max_tokens=1000", "--device=cpu"]) == 0
    result = json.loads((run / "eval" / "experts.json").read_text())
    # The fewest first pairs that hold 1000 target tokens.
    pairs = read_pairs(data, "test")
    n_pairs = int(np.searchsorted(np.cumsum(pairs.tgt_lengths), 1000)) + 1
    assert result["tokens"] == int(pairs.tgt_lengths[:n_pairs].sum()) >= 1000
    topics = (data / "test.topic").read_text().split()[:n_pairs]
    assert result["topics_available"]
    assert [layer["side"] for layer in result["layers"]] == ["encoder", "decoder"]
    encoder, decoder = result["layers"]
    contexts = [c for entry in encoder["experts"] for c, _ in entry["top_contexts"]]
    assert contexts and all("[" in c and "]" in c for c in contexts)
    assert "top_contexts" not in decoder["experts"][0]
    for layer in result["layers"]:
        assert layer["topics"]["n_topics"] == len(set(topics)) > 1
        assert (run / "eval" / layer["topics"]["heatmap"]).is_file()
    assert "most routed contexts" in markdown_section(result, "nmt", "")


def test_a_corpus_without_topics_still_gets_its_top_tokens(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--data", str(tiny_dataset), "--run", str(run), "--preset", "switch-8",
            "--n_heads=2", "--ffn_hidden=16", "--batch_size=8", "--bptt=10",
            "--eval_tokens=100", "--k=1", "--softmax=full", *TINY_RUN]  # fmt: skip
    assert train_main(argv) == 0
    capsys.readouterr()
    assert experts.main([str(run), "--max_tokens=200"]) == 0  # of its 267
    out = capsys.readouterr().out
    assert "no topics: the dataset stores no topics" in out
    result = json.loads((run / "eval" / "experts.json").read_text())
    assert not result["topics_available"] and result["layers"]
    assert all(layer["topics"] is None for layer in result["layers"])
    assert result["tokens"] == 200
    assert all(layer["tokens"] == 200 for layer in result["layers"])
    assert not list((run / "eval").glob("experts-topics-*.png"))
    assert "No topic analysis" in markdown_section(result, "switch", "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "config.json not found"),
        (["{run}", "--split=nope"], "no split"),
        (["{run}", "--top=0"], "must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_status_2(lm_run, tmp_path, capsys, args, message):
    argv = [a.format(missing=tmp_path / "none", run=lm_run) for a in args]
    assert experts.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_a_dense_run_has_no_experts_to_analyse(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "dense"
    argv = ["--data", str(tiny_dataset), "--run", str(run), "--preset", "4xLSTM-512",
            "--d_model=16", "--lstm_hidden=16", "--softmax=full", "--batch_size=8",
            "--bptt=10", "--eval_tokens=100", "--max_steps=1", "--quiet"]  # fmt: skip
    assert train_main(argv) == 0
    capsys.readouterr()
    assert experts.main([str(run)]) == 2
    assert "has no MoE layer" in capsys.readouterr().err


def test_markdown_shows_special_tokens_literally():
    expert = {"expert": 0, "load": 3, "top_tokens": [["</S>", 2], ["a|b", 1]]}
    layer = {"layer": 0, "name": "blocks.1.moe", "side": "lm", "n_experts": 1, "topics": None}
    layer["experts"] = [expert]
    result = {"tokens": 3, "split": "test", "topics_available": False, "layers": [layer]}
    text = markdown_section(result, "run", "")
    assert "| 0 | 3 | &lt;/S&gt; (2), a\\|b (1) |" in text
