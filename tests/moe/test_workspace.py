"""The reused CPU storage of workspace.py: a storage is handed out again only once nobody
else holds it, a held buffer is never written, sizes that move on get new storage, and a
layer's results do not depend on what its workspace held before."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from lstm_moe.moe import MoELayer
from lstm_moe.moe import workspace as workspace_module
from lstm_moe.moe.workspace import Workspace, _rounded_bytes


@pytest.fixture(autouse=True)
def reuse_at_any_size(monkeypatch):
    monkeypatch.setattr(workspace_module, "MIN_REUSED_BYTES", 0)


LIKE = torch.empty(0)


def test_a_storage_is_reused_once_its_tensor_is_gone():
    workspace = Workspace()
    first = workspace.empty("site", (100, 10), LIKE)
    address = first.data_ptr()
    del first
    again = workspace.empty("site", (100, 10), LIKE)
    assert again.data_ptr() == address
    assert again.shape == (100, 10) and again.is_contiguous() and again.dtype == torch.float32


def test_a_held_buffer_is_never_handed_out_again():
    workspace = Workspace()
    held = workspace.empty("site", (50,), LIKE).fill_(1.0)
    view = held[10:]  # a view keeps the storage too
    del held
    other = workspace.empty("site", (50,), LIKE).fill_(2.0)
    assert other.data_ptr() != view.data_ptr() - 10 * 4
    assert torch.equal(view, torch.ones(40))
    # Two storages per site at most: a third request while both are held is ordinary memory.
    third = workspace.empty("site", (50,), LIKE)
    assert workspace.kept_bytes() == 2 * _rounded_bytes(200)
    assert third.untyped_storage().data_ptr() not in (view.data_ptr() - 40, other.data_ptr())


def test_sizes_that_move_on_get_new_storage_and_the_old_one_is_given_back():
    workspace = Workspace()
    small = workspace.empty("site", (100,), LIKE)
    del small
    large = workspace.empty("site", (1000,), LIKE)  # does not fit: the idle 400 B go
    assert workspace.kept_bytes() == _rounded_bytes(4000)
    del large
    tiny = workspace.empty("site", (10,), LIKE)  # 4000 B is more than twice 40 B: replaced
    assert workspace.kept_bytes() == _rounded_bytes(40)
    del tiny
    near = workspace.empty("site", (9,), LIKE)  # within the rounding: the same storage
    assert workspace.kept_bytes() == _rounded_bytes(40)
    assert near.numel() == 9


def test_sites_and_dtypes_do_not_share_storage():
    workspace = Workspace()
    a = workspace.empty("a", (64,), LIKE)
    b = workspace.empty("b", (64,), LIKE)
    c = workspace.empty("a", (32,), torch.empty(0, dtype=torch.float64))
    assert len({a.data_ptr(), b.data_ptr(), c.data_ptr()}) == 3
    assert c.dtype == torch.float64


def test_rounding_adds_at_most_an_eighth():
    for n in (1, 7, 8, 9, 1000, 4097, 10**9 + 7):
        rounded = _rounded_bytes(n)
        assert n <= rounded <= n + max(1, n // 8) + 1


def test_small_and_non_cpu_requests_get_ordinary_memory(monkeypatch):
    monkeypatch.setattr(workspace_module, "MIN_REUSED_BYTES", 1 << 20)
    workspace = Workspace()
    workspace.empty("site", (100,), LIKE)
    assert workspace.kept_bytes() == 0


def test_copies_and_pickles_start_empty():
    workspace = Workspace()
    kept = workspace.empty("site", (100,), LIKE)
    assert copy.deepcopy(workspace).kept_bytes() == 0
    assert pickle.loads(pickle.dumps(workspace)).kept_bytes() == 0
    assert workspace.kept_bytes() > 0 and kept.numel() == 100


def _step(layer, x, grad):
    out = layer(x)
    ((out.output * grad).sum() + out.aux_loss).backward()
    return out.output.detach().clone()


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("router,k,capacity_factor", [("noisy_topk", 2, None), ("switch", 1, 1.0)])
def test_repeated_steps_on_one_workspace_give_a_fresh_layers_results(
    router, k, capacity_factor, set_to_none, monkeypatch
):
    """Step after step on reused storage (gradients taken over by .grad or accumulated into
    it) gives exactly what a layer with nothing kept gives."""
    # The paths that keep buffers (at this size the padded bmm and by-slot combine are taken).
    monkeypatch.setattr("lstm_moe.moe.experts._PADDED_MAX_MACS_PER_EXPERT", 0)
    monkeypatch.setattr("lstm_moe.moe.dispatch._COMBINE_BLOCK_ELEMENTS", 20)
    torch.manual_seed(0)
    layer = MoELayer(6, 5, 7, k, router, capacity_factor=capacity_factor).eval()
    with torch.no_grad():
        for p in layer.router.parameters():
            p.normal_(0.0, 0.5)
    inputs = [torch.randn(12, 6, requires_grad=True) for _ in range(3)]
    grads = [torch.randn(12, 6) for _ in range(3)]
    for x, grad in zip(inputs, grads, strict=True):
        fresh = copy.deepcopy(layer)  # an empty workspace, the same parameters
        want_out = _step(fresh, x, grad)
        want = {name: p.grad for name, p in fresh.named_parameters() if p.grad is not None}
        layer.zero_grad(set_to_none=set_to_none)
        got_out = _step(layer, x, grad)
        assert torch.equal(got_out, want_out)
        for name, p in layer.named_parameters():
            if name in want:
                assert torch.equal(p.grad, want[name]), name
    assert layer.experts.workspace.kept_bytes() > 0 and layer.workspace.kept_bytes() > 0
