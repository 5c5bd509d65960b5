"""End to end on the generated corpus: prepare → train → resume → evaluate → report, as
`make demo` chains them (at a size that runs in seconds)."""

import json
import shutil

from data_prep.synthetic import PRESETS, prepare_synthetic
from eval.perplexity import main as perplexity_main
from eval.report import main as report_main
from lstm_moe.train import main as train_main

MODEL = ["--d_model=16", "--lstm_hidden=16", "--softmax=full", "--dropout=0.0"]
TRAIN = ["--batch_size=4", "--bptt=10", "--warmup_steps=5", "--lr=0.01", "--eval_every=10"]
TRAIN += ["--eval_tokens=400", "--checkpoint_every=10", "--log_every=5", "--quiet"]


def test_prepare_train_resume_evaluate_report(tmp_path):
    data = prepare_synthetic(PRESETS["tiny"], tmp_path / "data")
    runs = tmp_path / "runs"
    dense = ["--preset", "4xLSTM-512"]
    moe = ["--preset", "MoE-32", "--n_experts=4", "--k=2", "--expert_hidden=16"]
    for name, model in (("dense", dense), ("moe", moe)):
        run = ["--data", str(data), "--run", str(runs / name), *model, *MODEL, *TRAIN]
        assert train_main([*run, "--max_steps=10"]) == 0
        assert train_main(["--run", str(runs / name), "--resume", "--max_steps=20", "--quiet"]) == 0
        assert perplexity_main([str(runs / name)]) == 0
    out = runs / "report"
    assert report_main([str(runs / "dense"), str(runs / "moe"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    meta = json.loads((data / "meta.json").read_text())
    assert summary["entropy_floor_perplexity"] == meta["entropy_floor"]["perplexity"]
    assert [m["name"] for m in summary["models"]] == ["dense", "moe"]
    for model in summary["models"]:
        assert model["tokens_trained"] == 20 * 4 * 10
        assert model["test_perplexity"] > summary["entropy_floor_perplexity"]
    assert len(summary["models"][1]["moe_layers"]) == 1 and not summary["models"][0]["moe_layers"]
    report = (out / "report.md").read_text()
    assert "entropy floor" in report.lower() and "| moe |" in report
    assert (out / "valid_perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A run trained and evaluated on another dataset is not comparable: the report refuses it.
    other = runs / "moe-other-data"
    shutil.copytree(runs / "moe", other)
    config = json.loads((other / "config.json").read_text())
    config["data"]["recipe_id"] = "another"
    (other / "config.json").write_text(json.dumps(config))
    assert report_main([str(runs / "dense"), str(other), "--out", str(runs / "mixed")]) == 2
    assert not (runs / "mixed" / "summary.json").exists()
