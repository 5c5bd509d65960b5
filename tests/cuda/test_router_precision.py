"""Selective precision on CUDA (Switch Transformers §2.4): under bf16 autocast, and in a layer
cast to bf16 as a whole, every router computes in float32 (its logits, gates, losses and
statistics; no tensor it makes is bf16) while the experts compute in bf16, and the gradients
that reach the router are float32 and finite."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lstm_moe.moe import MoELayer
from tests.cuda.device import CUDA, needs_cuda
from tests.switch.test_transformer import ROUTERS

pytestmark = needs_cuda

D, H, E, T = 64, 128, 4, 256


class FloatDtypes(TorchFunctionMode):
    """The dtypes of every floating-point tensor the torch calls made while it is active
    produce (logits, softmax, top-k values, losses: each intermediate, not only results),
    except views of the given parameters (a parameter read as it is stored: a bf16 layer's
    router weights are bf16, and the router casts them before any arithmetic)."""

    def __init__(self, parameters) -> None:
        super().__init__()
        self.stored = {p.untyped_storage().data_ptr() for p in parameters}
        self.dtypes: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
                continue
            if leaf.untyped_storage().data_ptr() not in self.stored:
                self.dtypes.add(leaf.dtype)
        return out


def watch(layer: MoELayer, monkeypatch) -> dict:
    """Record what the router computes (every floating dtype, and its Routing) and what dtype
    the experts return."""
    seen: dict = {"router": FloatDtypes(layer.router.parameters()), "routing": [], "experts": set()}
    route = layer.router.forward

    def recorded(*args, **kwargs):
        with seen["router"]:
            routing = route(*args, **kwargs)
        seen["routing"].append(routing)
        return routing

    monkeypatch.setattr(layer.router, "forward", recorded)
    layer.experts.register_forward_hook(lambda m, i, out: seen["experts"].add(out.dtype))
    return seen


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("precision", ["autocast", "bf16 layer"])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_the_router_computes_in_float32_and_the_experts_in_bf16(
    router, precision, training, monkeypatch
):
    torch.manual_seed(0)
    layer = MoELayer(D, E, H, router=router, **ROUTERS[router]).to(CUDA).train(training)
    x = torch.randn(T, D, device=CUDA)
    if precision == "bf16 layer":
        layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    x.requires_grad_()
    seen = watch(layer, monkeypatch)
    with torch.autocast("cuda", torch.bfloat16, enabled=precision == "autocast"):
        out = layer(x)
    (out.output.float().square().mean() + out.aux_loss).backward()

    assert seen["router"].dtypes == {torch.float32}, seen["router"].dtypes
    (routing,) = seen["routing"]
    for name in ("gates", "importance", "load", "aux_loss"):
        assert getattr(routing, name).dtype == torch.float32, name
    assert all(loss.dtype == torch.float32 for loss in routing.losses.values())
    assert seen["experts"] == {torch.bfloat16}
    assert torch.isfinite(out.output).all() and torch.isfinite(out.aux_loss)
    router_grads = [p.grad for p in layer.router.parameters() if p.grad is not None]
    assert router_grads and all(torch.isfinite(g).all() for g in router_grads)
    if precision == "autocast":  # float32 master weights: their gradients are float32
        assert all(g.dtype == torch.float32 for g in router_grads)
        expert_grads = [p.grad for p in layer.experts.parameters()]
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in expert_grads)
