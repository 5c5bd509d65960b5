"""Gradient checks in float64 (torch.autograd.gradcheck) and at the zero initialisation."""

import torch

from lstm_moe.moe import MoELayer, NoisyTopKRouter
from lstm_moe.moe.experts import grouped_matmul
from lstm_moe.moe.hierarchical import HierarchicalRouter


def _aux_loss_of(router_cls, x, **kwargs):
    router = router_cls(**kwargs).double().train()
    names = [n for n, _ in router.named_parameters()]

    def aux_loss(*params):
        # The same noise for every evaluation: the loss is a smooth function of the weights
        # while no perturbation changes which experts are selected.
        torch.manual_seed(3)
        out = torch.func.functional_call(router, dict(zip(names, params, strict=True)), (x,))
        return out.aux_loss

    return aux_loss, [p.detach().normal_(0, 0.3).requires_grad_() for p in router.parameters()]


def test_gradcheck_noisy_top_k_aux_loss_wrt_w_gate_and_w_noise():
    x = torch.randn(10, 5, dtype=torch.float64)
    fn, params = _aux_loss_of(NoisyTopKRouter, x, d_model=5, n_experts=6, k=2)
    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6)


def test_gradcheck_hierarchical_aux_loss():
    x = torch.randn(10, 5, dtype=torch.float64)
    fn, params = _aux_loss_of(
        HierarchicalRouter, x, d_model=5, n_groups=3, experts_per_group=4, k_groups=2, k=2
    )
    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6)


def test_gradcheck_layer_output_wrt_input_and_expert_weights():
    layer = MoELayer(4, 5, 6, 2, capacity_factor=0.8).double().eval()
    with torch.no_grad():
        layer.router.w_gate.normal_()
    names = [n for n, _ in layer.experts.named_parameters()]

    def output(x, *expert_params):
        params = {f"experts.{n}": p for n, p in zip(names, expert_params, strict=True)}
        return torch.func.functional_call(layer, params, (x,)).output

    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in layer.experts.parameters()]
    assert torch.autograd.gradcheck(output, (x, *params), eps=1e-6, atol=1e-6)


def test_gradcheck_grouped_matmul_fp64_path():
    rows = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([4, 0, 5])  # an expert with no rows
    assert torch.autograd.gradcheck(lambda r, w: grouped_matmul(r, w, counts), (rows, weight))


def test_gradients_finite_at_zero_init():
    """W_g = W_noise = 0: all experts equally likely, CV² at its minimum. The gradients of the
    auxiliary loss must be finite (no sqrt, no 0/0)."""
    for router, options in (("noisy_topk", {}), ("hierarchical", {"n_groups": 4})):
        layer = MoELayer(8, 16, 8, 2 if router == "hierarchical" else 4, router, **options).train()
        x = torch.randn(64, 8)
        out = layer(x)
        (out.output.sum() + out.aux_loss).backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert torch.isfinite(out.aux_loss)
