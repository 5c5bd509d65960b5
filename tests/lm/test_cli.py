"""What a newcomer meets on the command line: a second `make lm1b` with the same
TRAIN_ARGS resumes, real changes are refused in one line, broken files are named, typos get
a suggestion, and --help says what each field is."""

import pytest
import torch

from eval.perplexity import main as perplexity_main
from eval.translate import main as translate_main
from lstm_moe.train import main as train_main
from tests.lm.test_train import train

MODEL_ARGS = ["--d_model=16", "--lstm_hidden=16", "--n_experts=4", "--k=2"]


class NotATensor:
    """A pickled class in a checkpoint: what torch.load(weights_only=True) refuses."""


@pytest.fixture
def run(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_dataset, run, "--max_steps=10") == 0
    return run


def resume(run, *extra):
    return train_main(["--run", str(run), "--resume", "--quiet", *extra])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_resume_accepts_fields_equal_to_the_runs_and_refuses_changes(run, capsys):
    # The second `make lm1b TRAIN_ARGS="--d_model=16 ..."`: the same values, a longer budget.
    assert resume(run, "--max_steps=15", *MODEL_ARGS, "--batch_size=8", "--lr=0.01") == 0
    capsys.readouterr()
    assert resume(run, "--max_steps=20", "--d_model=32") == 2
    assert "d_model" in one_error_line(capsys)
    assert resume(run, "--max_steps=20", "--lr=0.5") == 2
    assert "'lr'" in one_error_line(capsys)


def test_resume_refuses_another_preset(run, capsys):
    assert resume(run, "--max_steps=15", "--preset", "MoE-4") == 2
    assert "preset 'MoE-32', not 'MoE-4'" in one_error_line(capsys)
    assert resume(run, "--max_steps=15", "--preset", "MoE-32") == 0


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"model": NotATensor()}, "holds non-tensor objects (pickled Python classes)"),
        (torch.zeros(3), "is not a checkpoint: it holds a Tensor, not a dict"),
        ("drop rng", "is not a complete checkpoint: it has no rng"),
    ],
)  # fmt: skip
def test_a_malformed_checkpoint_is_one_line_naming_the_file(run, capsys, payload, message):
    path = run / "checkpoint.pt"
    if payload == "drop rng":
        payload = torch.load(path, weights_only=True)
        del payload["rng"]
    torch.save(payload, path)
    assert resume(run, "--max_steps=15") == 2
    line = one_error_line(capsys)
    assert str(path) in line and message in line, line
    assert "weights_only=False" not in line


def test_invalid_json_names_the_file(run, tiny_dataset, tmp_path, capsys):
    config = run / "config.json"
    config.write_text(config.read_text().replace(",", "", 1))
    assert resume(run, "--max_steps=15") == 2
    assert f"{config} is not valid JSON" in one_error_line(capsys)
    assert perplexity_main([str(run)]) == 2
    assert f"{config} is not valid JSON" in one_error_line(capsys)

    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text('{"format": "moe-repro-lm/1" "vocab": 3}')
    assert train(data, tmp_path / "other", "--max_steps=1") == 2
    assert f"{data / 'meta.json'} is not valid JSON" in one_error_line(capsys)


def test_a_misspelt_field_gets_the_nearest_name(tiny_dataset, tmp_path, capsys):
    assert train(tiny_dataset, tmp_path / "run", "--max_steps=1", "--n_expert=8") == 2
    line = one_error_line(capsys)
    assert "--n_expert" in line and "did you mean --n_experts" in line
    assert train(tiny_dataset, tmp_path / "run", "--max_steps=1", "--zzz=8") == 2
    line = one_error_line(capsys)  # nothing near: every field, the model's included
    assert "model fields: " in line and "n_experts" in line and "training fields: " in line


def test_help_lists_types_defaults_choices_and_what_resume_may_change(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--n_experts=int (default 32)" in text
    assert "--softmax=str (default sampled), one of full, sampled" in text
    assert "--capacity_factor=float|none (default none)" in text
    assert "--max_tokens=int|none (default none); --resume may change it" in text
    assert "--lr=float (default 0.001)\n" in text  # fixed by the run: not marked


def test_evaluation_input_errors_exit_2(tmp_path, capsys):
    assert perplexity_main([str(tmp_path / "no-such-run")]) == 2
    assert "config.json not found" in one_error_line(capsys)


@pytest.mark.parametrize("command", ["train", "perplexity", "translate"])
def test_a_cuda_device_this_torch_cannot_use_is_one_line_and_status_2(
    command, tiny_dataset, tmp_path, capsys
):
    if torch.cuda.is_available():
        pytest.skip("this torch sees a CUDA device")
    argv = {
        "train": [
            "--data",
            str(tiny_dataset),
            "--run",
            str(tmp_path / "r"),
            "--device=cuda",
            "--max_steps=1",
        ],
        "perplexity": [str(tmp_path), "--device", "cuda"],
        "translate": [str(tmp_path), "--device", "cuda"],
    }[command]
    run = {"train": train_main, "perplexity": perplexity_main, "translate": translate_main}
    assert run[command](argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: device 'cuda'") and "sees no CUDA device" in err[-1]
