import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(params=["small", "large"])
def cpu_expert_path(request, monkeypatch):
    """Both sets of CPU paths: at the tests' sizes the padded bmm and the by-slot combine are
    taken; "large" turns them off, for the per-expert GEMMs and the blockwise combine."""
    if request.param == "large":
        monkeypatch.setattr("lstm_moe.moe.experts._PADDED_MAX_MACS_PER_EXPERT", 0)
        monkeypatch.setattr("lstm_moe.moe.dispatch._COMBINE_BLOCK_ELEMENTS", 20)
    return request.param
