"""The Table 7 presets have the paper's sizes, and the preset command writes them."""

import json

import pytest

from lstm_moe.presets import PRESETS, TABLE_7, main, matches_table_7, model_size


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_sizes_equal_table_7(name):
    size = model_size(PRESETS[name])
    ops, params = TABLE_7[name]
    assert matches_table_7(size["ops_per_timestep"], ops), size
    assert matches_table_7(size["params_excl_embedding_softmax"], params), size


def test_hand_counted_moe_32():
    """Two 512-cell LSTMs: 4·512·(512+512) weights each plus one bias of 4·512; 32 experts of
    512·1024 + 1024·512; W_g and W_noise of 512·32. Per token, 4 experts and both gates."""
    lstm_weights, lstm_bias = 4 * 512 * 1024, 4 * 512
    expert, gates = 2 * 512 * 1024, 2 * 512 * 32
    size = model_size(PRESETS["MoE-32"])
    assert (
        size["params_excl_embedding_softmax"]
        == 2 * (lstm_weights + lstm_bias) + 32 * expert + gates
    )
    assert size["ops_per_timestep"] == 2 * lstm_weights + 4 * expert + gates
    # embedding and softmax (with its bias) over the 793,471-word vocabulary
    assert size["total_params"] == size["params_excl_embedding_softmax"] + 793_471 * (512 * 2 + 1)


def test_matches_table_7_accepts_rounding_or_truncation_only():
    assert matches_table_7(8_650_752, 8.6) and matches_table_7(8_650_752, 8.7)
    assert not matches_table_7(8_520_000, 8.6)


def test_presets_command_writes_json(tmp_path):
    path = tmp_path / "presets.json"
    assert main(["--json", str(path)]) == 0
    rows = json.loads(path.read_text())["presets"]
    assert [r["name"] for r in rows] == list(PRESETS)
    moe_4096 = next(r for r in rows if r["name"] == "MoE-4096-h")
    assert round(moe_4096["params_excl_embedding_softmax"] / 1e6, 1) == 4303.4
    assert set(rows[0]) == {
        "name",
        "ops_per_timestep",
        "params_excl_embedding_softmax",
        "total_params",
    }


def test_presets_command_lists_the_transformers(tmp_path):
    from switch.presets import TRANSFORMER_LM_PRESETS, TRANSFORMER_NMT_PRESETS

    path = tmp_path / "presets.json"
    assert main(["--json", str(path)]) == 0
    rows = {r["name"]: r for r in json.loads(path.read_text())["transformers"]}
    assert list(rows) == [*TRANSFORMER_LM_PRESETS, *TRANSFORMER_NMT_PRESETS]
    # 4 layers of width 256: attention 4·256², a 1024-wide FFN 2·256·1024
    assert rows["transformer-dense"]["ops_per_timestep"] == 4 * (4 * 256**2 + 2 * 256 * 1024)
    assert rows["switch-32"]["total_params"] > rows["transformer-dense"]["total_params"]
