"""Routers by name: the one mapping builds every router from a MoEConfig, the config's defaults
are each router's own, and a layer built from a router module records a config that rebuilds
the same router (name and every option)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lstm_moe.moe import (
    ROUTERS,
    BatchwiseRouter,
    ExpertChoiceRouter,
    HierarchicalRouter,
    MoEConfig,
    MoELayer,
    NoisyTopKRouter,
    SwitchRouter,
    build_router,
)

D, H, E = 12, 16, 8

# Each router with options other than its defaults; the layer's k is its experts per token.
MODULES = {
    "noisy_topk": (
        lambda: NoisyTopKRouter(D, E, 3, w_importance=0.05, w_load=0.2, noise_epsilon=0.05),
        3,
    ),
    "hierarchical": (
        lambda: HierarchicalRouter(
            D, 4, 2, k_groups=3, k=1, w_importance=0.3, w_load=0.02, noise_epsilon=0.03
        ),
        3,
    ),
    "batchwise": (
        lambda: BatchwiseRouter(
            D, E, 3, w_importance=0.01, w_load=0.02, w_threshold=0.5, init_std=0.3
        ),
        3,
    ),
    "switch": (
        lambda: SwitchRouter(
            D, E, 2, w_balance=0.05, w_z=1e-3, jitter_eps=0.2, init_scale=0.5, renormalize=False
        ),
        2,
    ),
    "expert_choice": (
        lambda: ExpertChoiceRouter(
            D, E, 1, capacity_factor=0.75, eval_capacity_factor=1.5, init_scale=0.5
        ),
        1,
    ),
}


def test_one_mapping_names_every_router():
    assert list(ROUTERS) == ["noisy_topk", "hierarchical", "batchwise", "switch", "expert_choice"]
    for name, cls in ROUTERS.items():
        assert cls.name == name


@pytest.mark.parametrize("name", list(ROUTERS))
def test_the_config_defaults_are_each_routers_own(name):
    """Built by name with the config's defaults, each router has the options its class gives
    when none are passed."""
    n_groups = 4 if name == "hierarchical" else None
    router = build_router(MoEConfig(D, E, H, k=2, router=name, n_groups=n_groups))
    assert type(router) is ROUTERS[name]
    plain = {
        "noisy_topk": lambda: NoisyTopKRouter(D, E, 2),
        "hierarchical": lambda: HierarchicalRouter(D, 4, 2, k=2),
        "batchwise": lambda: BatchwiseRouter(D, E, 2),
        "switch": lambda: SwitchRouter(D, E, 2),
        "expert_choice": lambda: ExpertChoiceRouter(D, E, 2),
    }[name]()
    assert router.config_fields() == plain.config_fields()


@pytest.mark.parametrize("name", list(MODULES))
def test_a_layer_from_a_router_module_records_a_config_that_rebuilds_it(name):
    make, k = MODULES[name]
    torch.manual_seed(0)
    router = make()
    with torch.no_grad():  # weights unlike any fresh draw, so loading the state dict matters
        for key, p in router.named_parameters():
            if key != "thresholds":
                p.normal_(0.0, 0.5)
    layer = MoELayer(D, E, H, k, router=router, capacity_factor=0.75)
    config = layer.config
    assert config.router == name
    for field, value in router.config_fields().items():
        assert getattr(config, field) == value, field
    assert config.experts_per_token == k

    rebuilt = MoELayer.from_config(config)
    assert type(rebuilt.router) is type(router)
    assert rebuilt.router.config_fields() == router.config_fields()
    assert rebuilt.config == config
    want_shapes = {key: value.shape for key, value in layer.state_dict().items()}
    assert {key: value.shape for key, value in rebuilt.state_dict().items()} == want_shapes
    rebuilt.load_state_dict(layer.state_dict())

    x = torch.randn(20, D)
    for training in (True, False):
        layer.train(training), rebuilt.train(training)
        torch.manual_seed(1)
        want = layer(x)
        torch.manual_seed(1)
        got = rebuilt(x)
        torch.testing.assert_close(got.output, want.output, atol=0, rtol=0)
        torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=0, rtol=0)
        assert got.losses.keys() == want.losses.keys()
        assert torch.equal(got.stats.tokens_per_expert, want.stats.tokens_per_expert)


@pytest.mark.parametrize("name", list(MODULES))
def test_by_name_with_the_same_options_builds_the_same_router(name):
    make, k = MODULES[name]
    router = make()
    fields = router.config_fields()
    options = {f: v for f, v in fields.items() if f not in ("router", "n_experts", "k")}
    by_name = MoELayer(D, E, H, fields["k"], name, **options)
    assert type(by_name.router) is type(router)
    assert by_name.router.config_fields() == fields
    assert by_name.config.experts_per_token == k


def test_the_config_round_trips_through_a_dict():
    layer = MoELayer(D, E, H, 2, router=MODULES["switch"][0]())
    config = MoEConfig(**dataclasses.asdict(layer.config))
    assert config == layer.config


def test_a_router_of_another_width_is_refused():
    with pytest.raises(ValueError, match=r"the router's d_model \(10\) must equal the layer's"):
        MoELayer(D, E, H, 1, router=SwitchRouter(10, E, 1))
    with pytest.raises(ValueError, match=r"the router's d_model"):
        MoELayer(D, E, H, 2, router=HierarchicalRouter(10, 4, 2, k_groups=2, k=1))


def test_an_option_that_disagrees_with_the_router_module_is_refused():
    with pytest.raises(ValueError, match=r"the router's w_z \(0.0\) must equal the layer's"):
        MoELayer(D, E, H, 1, router=SwitchRouter(D, E, 1), w_z=1e-3)
    # The same value is no conflict.
    MoELayer(D, E, H, 1, router=SwitchRouter(D, E, 1, w_z=1e-3), w_z=1e-3)


def test_a_module_that_is_not_one_of_the_routers_is_refused():
    with pytest.raises(TypeError, match="router must be a name in"):
        MoELayer(D, E, H, 1, router=torch.nn.Linear(D, E))


@pytest.mark.parametrize(
    ("router", "ops"),
    [
        (NoisyTopKRouter(D, E, 2), 2 * D * E),  # W_g and W_noise
        # Primary W_g, W_noise over 4 groups; k_groups = 3 secondary pairs of [D, 2].
        (HierarchicalRouter(D, 4, 2, k_groups=3, k=1), 2 * D * 4 + 3 * 2 * D * 2),
        (BatchwiseRouter(D, E, 2), D * E),  # W_g only
        (SwitchRouter(D, E, 1), D * E),  # W_r only
    ],
)
def test_gating_ops_per_token(router, ops):
    assert router.gating_ops_per_token() == ops
