"""Bad arguments raise a ValueError that names the parameter and the allowed range."""

import pytest
import torch

from lstm_moe.moe import MoELayer


@pytest.mark.parametrize(
    "args,options,message",
    [
        ((8, 4, 16, 0), {}, r"k must be in \[1, 4\]"),
        ((8, 4, 16, 5), {}, r"k must be in \[1, 4\]"),
        ((8, 0, 16, 1), {}, r"n_experts must be >= 1"),
        ((8, 4, 0, 1), {}, r"expert_hidden must be >= 1"),
        ((8, 4, 16, 2), {"capacity_factor": 0.0}, r"capacity_factor must be > 0"),
        ((8, 4, 16, 2), {"capacity_factor": -1.0}, r"capacity_factor must be > 0"),
        ((8, 4, 16, 2), {"router": "token_choice"}, r"router must be one of"),
        ((8, 10, 16, 2), {"router": "hierarchical", "n_groups": 3}, r"multiple of n_groups"),
        ((8, 12, 16, 2), {"router": "hierarchical"}, r"n_groups must be an integer >= 1"),
        (
            (8, 12, 16, 2),
            {"router": "hierarchical", "n_groups": 3, "k_groups": 4},
            r"k_groups must be in \[1, 3\]",
        ),
        ((8, 12, 16, 5), {"router": "hierarchical", "n_groups": 3}, r"k must be in \[1, 4\]"),
        ((8, 4, 16, 2), {"noise_epsilon": -1e-3}, r"noise_epsilon must be >= 0"),
        ((8, 4, 16, 1), {"router": "switch", "w_balance": -1.0}, r"w_balance must be >= 0"),
        ((8, 4, 16, 1), {"router": "switch", "w_z": -1.0}, r"w_z must be >= 0"),
        ((8, 4, 16, 1), {"router": "switch", "jitter_eps": 1.0}, r"jitter_eps must be in \[0, 1\)"),
        ((8, 4, 16, 1), {"router": "switch", "switch_init_scale": 0.0}, r"switch_init_scale must"),
        ((8, 4, 16, 2), {"router": "batchwise", "batchwise_init_std": 0.0}, r"batchwise_init_std"),
    ],
)
def test_bad_arguments(args, options, message):
    router = options.pop("router", "noisy_topk")
    with pytest.raises(ValueError, match=message):
        MoELayer(*args, router=router, **options)


def test_wrong_input_width():
    layer = MoELayer(8, 4, 16, 2)
    with pytest.raises(ValueError, match=r"d_model=8, got 6"):
        layer(torch.randn(3, 6))
