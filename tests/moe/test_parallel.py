"""Expert parallelism (parallel.py) equals one process on the concatenated batch.

Over 2 and 4 gloo processes on CPU: outputs, the auxiliary loss, each loss, the routing
statistics and the gradients (of the input, of the router, and each rank's shard of the
expert gradients) match a single-process MoELayer run on [rank 0's tokens; rank 1's; ...]
with the same weights, for every router (expert choice choosing over the global batch),
dropless and with capacity, in training and
evaluation mode, with uneven batches per rank. The same holds when every rank pads its tokens
(padded rows among them, masked out): the real tokens get the unpadded one-process results,
and the padded rows output 0 and get no gradient. A hand-set routing sends no token to one
rank's experts and gives another rank no tokens at all. State dicts are sharded and gathered
back exactly. One spawned run per world size checks every case (starting processes is slow).

Objective: each rank minimises (output · projection).sum() + aux_loss over its own tokens, so
the single-process equivalent is the sum over ranks, (output · projection).sum() + W·aux_loss;
router gradients are summed over ranks before they are compared (parallel.py, "Gradients").

Noise: a rank draws noise for its own tokens only. In the workers torch.randn_like (noisy
top-k) and torch.rand_like (the Switch router's input jitter) are replaced by functions
returning rows of one tensor drawn for the global batch, so each rank's noise is the rows of
the single-process noise that belong to its tokens (placed at the real rows of a padded batch).
The hierarchical gate's secondary draw is over (token, group) pairs whose global order a rank
does not know, so in training mode it is checked with zero noise: the smooth Load estimator of
Eq. 9-10 and the gradients of W_noise still run, only the random perturbation is absent.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lstm_moe.moe import (
    MoELayer,
    ParallelGroup,
    expert_tensor_names,
    gather_state_dict,
    plan_dispatch,
    shard_state_dict,
    share_capacity,
)
from lstm_moe.moe.experts import BatchedExperts
from lstm_moe.moe.parallel import _expert_major_order
from switch import SwitchRouter
from tests.ranks import free_port

D, H = 12, 16  # rows of 48 and 64 bytes (aligned as the grouped kernel needs, where it runs)
TOL = dict(atol=1e-5, rtol=1e-5)
# Tokens per rank, uneven on purpose.
SPLITS = {1: (13,), 2: (9, 5), 4: (6, 2, 7, 3)}
# For the hand-set routing: one rank has no tokens at all.
HAND_SPLITS = {2: (11, 0), 4: (5, 0, 6, 3)}
CASES = {
    "noisy_topk": dict(n_experts=8, k=2, router="noisy_topk"),
    # Four groups: one per rank at 4 ranks, as the paper places them; two per rank at 2.
    "hierarchical": dict(
        n_experts=8, k=1, router="hierarchical", n_groups=4, k_groups=2, expert_bias=True
    ),
    "batchwise": dict(n_experts=8, k=2, router="batchwise"),
    # switch/'s router: top-1 (token order) and top-2 (capacity to first choices first).
    "switch_top1": dict(n_experts=8, k=1, router="switch"),
    "switch_top2": dict(n_experts=8, k=2, router="switch"),
    # Each expert chooses over the global batch (c = 2 when capacity_factor is None).
    "expert_choice": dict(n_experts=8, k=1, router="expert_choice"),
}
CAPACITY_FACTORS = (None, 0.5)


def make_layer(case: str, capacity_factor, process_group=None) -> MoELayer:
    """The same model at every world size: same seed, each rank drawing its own experts."""
    torch.manual_seed(0)
    options = dict(CASES[case])
    n_experts, k, router = options.pop("n_experts"), options.pop("k"), options.pop("router")
    if router == "switch":
        router = SwitchRouter(D, n_experts, k, w_z=1e-2, jitter_eps=0.3)
    layer = MoELayer(
        D,
        n_experts,
        H,
        k,
        router,
        capacity_factor=capacity_factor,
        process_group=process_group,
        **options,
    )
    with torch.no_grad():  # non-zero gating weights, so that routing depends on the input
        for name, p in layer.router.named_parameters():
            if name != "thresholds":
                p.normal_(0.0, 0.5)
    return layer


@contextlib.contextmanager
def noise_from(noise: torch.Tensor | None, first_row: int, mask: torch.Tensor | None = None):
    """torch.randn_like (the 2017 gates' noise) and torch.rand_like (the Switch router's
    jitter) return rows [first_row, first_row + R) of `noise`; randn_like gives zeros and
    rand_like one half (no jitter) if noise is None. With a mask ([T] bool, the real rows of a
    padded batch), the R real rows get those rows and the padded ones the default."""
    originals = torch.randn_like, torch.rand_like

    def drawer(default: float):
        def draw(like, **_):
            if noise is None:
                return torch.full_like(like, default)
            assert like.shape[1] == noise.shape[1], (like.shape, noise.shape)
            if mask is None:
                return noise[first_row : first_row + like.shape[0]].to(like.dtype)
            out = torch.full_like(like, default)
            out[mask] = noise[first_row : first_row + int(mask.sum())].to(like.dtype)
            return out

        return draw

    torch.randn_like, torch.rand_like = drawer(0.0), drawer(0.5)
    try:
        yield
    finally:
        torch.randn_like, torch.rand_like = originals


def run_layer(layer, x, projection, aux_weight, noise, first_row, mask=None):
    """Forward and backward of (output · projection).sum() + aux_weight · aux."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with noise_from(noise, first_row, mask):
        result = layer(x, mask=mask)
    ((result.output * projection).sum() + aux_weight * result.aux_loss).backward()
    return result, x.grad


class Checks:
    """Collects mismatches so that every rank runs every collective before anything fails."""

    def __init__(self, rank: int):
        self.rank, self.failures = rank, []

    def close(self, what: str, got, want, exact: bool = False) -> None:
        tol = dict(atol=0.0, rtol=0.0) if exact else TOL
        try:
            torch.testing.assert_close(got, want, **tol)
        except AssertionError as error:
            self.failures.append(f"rank {self.rank}, {what}: {error}")

    def raise_if_any(self) -> None:
        if self.failures:
            raise AssertionError("\n".join(self.failures))


def summed_grad(p: torch.Tensor) -> torch.Tensor:
    grad = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    dist.all_reduce(grad)
    return grad


def grad_or_zero(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad


def padding_of(n_real: int) -> torch.Tensor:
    """[T] bool for n_real tokens padded: a padded row first and after every second real one."""
    mask = []
    while sum(mask) < n_real:
        mask += [False, True, True]
    return torch.tensor(mask[: len(mask) - (sum(mask) - n_real)], dtype=torch.bool)


def padded(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """rows [R, D] at the real positions of mask [T]; large values at the padded ones."""
    out = torch.full((mask.numel(), rows.shape[1]), 50.0)
    out[mask] = rows
    return out


def check_layer_case(checks, case, capacity_factor, training, world, rank):
    group = ParallelGroup(dist.group.WORLD)
    split = SPLITS[world]
    first_row, n_tokens = sum(split[:rank]), sum(split)
    rows = slice(first_row, first_row + split[rank])
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n_tokens, D, generator=generator)
    projection = torch.linspace(-1, 1, n_tokens * D).view(n_tokens, D)
    noise = None
    if training and case == "noisy_topk":
        noise = torch.randn(n_tokens, CASES[case]["n_experts"], generator=generator)
    if training and case.startswith("switch"):
        noise = torch.rand(n_tokens, D, generator=generator)  # the input jitter
    name = f"{case}, capacity_factor={capacity_factor}, training={training}"

    single = make_layer(case, capacity_factor).train(training)
    sharded = make_layer(case, capacity_factor, dist.group.WORLD).train(training)
    # The same model at any world size; the shards gather back into the full state dict.
    full_state, experts = single.state_dict(), expert_tensor_names(single)
    for key, value in shard_state_dict(full_state, group, experts).items():
        checks.close(f"{name}: initial {key}", sharded.state_dict()[key], value, exact=True)
    for key, value in gather_state_dict(sharded.state_dict(), group, experts).items():
        checks.close(f"{name}: gathered {key}", value, full_state[key], exact=True)

    want, want_x_grad = run_layer(single, x, projection, world, noise, 0)
    got, got_x_grad = run_layer(sharded, x[rows], projection[rows], 1.0, noise, first_row)
    compare(checks, name, got, got_x_grad, want, want_x_grad[rows], sharded, single, rows, group)
    drops = case != "expert_choice"  # its capacity leaves tokens unchosen, drops none
    if capacity_factor is not None and drops and rank == 0 and not want.stats.fraction_dropped > 0:
        checks.failures.append(f"{name}: the capacity dropped nothing, the case is too easy")

    # Each rank's tokens padded: the real ones get the unpadded one-process results.
    mask = padding_of(split[rank])
    x_padded, projection_padded = padded(x[rows], mask), padded(projection[rows], mask)
    got, got_x_grad = run_layer(sharded, x_padded, projection_padded, 1.0, noise, first_row, mask)
    name = f"{name}, padded"
    zeros = torch.zeros(int((~mask).sum()), D)
    checks.close(f"{name}: padded output", got.output[~mask], zeros, exact=True)
    checks.close(f"{name}: padded input gradient", got_x_grad[~mask], zeros, exact=True)
    got.output = got.output[mask]
    compare(
        checks, name, got, got_x_grad[mask], want, want_x_grad[rows], sharded, single, rows, group
    )


def compare(checks, name, got, got_x_grad, want, want_x_grad, sharded, single, rows, group):
    """This rank's results (got) against the one-process run (want) on the global batch."""
    checks.close(f"{name}: output", got.output, want.output[rows])
    checks.close(f"{name}: input gradient", got_x_grad, want_x_grad)
    checks.close(f"{name}: aux_loss", got.aux_loss, want.aux_loss)
    if got.losses.keys() != want.losses.keys():
        checks.failures.append(f"rank {checks.rank}, {name}: losses {got.losses.keys()}")
    for loss in want.losses:
        checks.close(f"{name}: loss {loss}", got.losses[loss], want.losses[loss])
    for stat in ("importance", "load", "cv_importance", "cv_load", "max_over_mean_load"):
        checks.close(f"{name}: {stat}", getattr(got.stats, stat), getattr(want.stats, stat))
    checks.close(
        f"{name}: tokens_per_expert",
        got.stats.tokens_per_expert,
        want.stats.tokens_per_expert,
        exact=True,
    )
    checks.close(
        f"{name}: fraction_dropped", got.stats.fraction_dropped, want.stats.fraction_dropped
    )
    for stat, value in want.stats.extra.items():
        checks.close(f"{name}: {stat}", got.stats.extra[stat], value)

    single_params = dict(single.named_parameters())
    first, last = group.expert_range(single.config.n_experts)
    for key, p in sharded.named_parameters():
        want_grad = grad_or_zero(single_params[key])
        if key.startswith("experts."):
            checks.close(f"{name}: grad {key}", grad_or_zero(p), want_grad[first:last])
        else:
            checks.close(f"{name}: grad {key} summed over ranks", summed_grad(p), want_grad)


def check_hand_set_routing(checks, capacity_factor, world, rank):
    """No pair is routed to rank 1's experts, and rank 1 has no tokens; -1 slots included."""
    group = ParallelGroup(dist.group.WORLD)
    split = HAND_SPLITS[world]
    first_row, n_tokens = sum(split[:rank]), sum(split)
    rows = slice(first_row, first_row + split[rank])
    single = make_layer("noisy_topk", capacity_factor)
    sharded = make_layer("noisy_topk", capacity_factor, dist.group.WORLD)
    n_experts = single.config.n_experts
    idle_first, idle_last = n_experts // world, 2 * n_experts // world  # rank 1's experts
    allowed = torch.tensor([e for e in range(n_experts) if not idle_first <= e < idle_last])
    generator = torch.Generator().manual_seed(2)
    expert_index = allowed[torch.randint(len(allowed), (n_tokens, 3), generator=generator)]
    expert_index[::4, 2] = -1
    gates = torch.rand(n_tokens, 3, generator=generator).masked_fill(expert_index < 0, 0.0)
    x = torch.randn(n_tokens, D, generator=generator)
    projection = torch.linspace(-1, 1, n_tokens * D).view(n_tokens, D)
    name = f"hand-set routing, capacity_factor={capacity_factor}"

    def run(layer, tokens, index, gate, proj):
        tokens = tokens.clone().requires_grad_(True)
        gate = gate.clone().requires_grad_(True)
        output, dispatch = layer.mix_experts(tokens, index, gate)
        (output * proj).sum().backward()
        return output, dispatch, tokens.grad, gate.grad

    want = run(single, x, expert_index, gates, projection)
    got = run(sharded, x[rows], expert_index[rows], gates[rows], projection[rows])
    checks.close(f"{name}: output", got[0], want[0][rows])
    checks.close(f"{name}: token gradient", got[2], want[2][rows])
    checks.close(f"{name}: gate gradient", got[3], want[3][rows])
    for field in ("rows_per_expert", "routed_per_expert"):
        checks.close(
            f"{name}: {field}", getattr(got[1], field), getattr(want[1], field), exact=True
        )
    if got[1].n_tokens != n_tokens:
        checks.failures.append(f"rank {rank}, {name}: n_tokens {got[1].n_tokens}")
    first, last = group.expert_range(n_experts)
    for key, p in sharded.experts.named_parameters():
        want_grad = grad_or_zero(getattr(single.experts, key))[first:last]
        checks.close(f"{name}: grad experts.{key}", grad_or_zero(p), want_grad)
    if rank == 1 and got[1].rows_per_expert[idle_first:idle_last].any():
        checks.failures.append(f"{name}: rank 1's experts were given rows")


def worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    checks = Checks(rank)
    try:
        for case in CASES:
            for capacity_factor in CAPACITY_FACTORS:
                for training in (True, False):
                    check_layer_case(checks, case, capacity_factor, training, world, rank)
        for capacity_factor in (None, 0.5):
            check_hand_set_routing(checks, capacity_factor, world, rank)
        try:
            MoELayer(D, world + 1, H, 2, process_group=dist.group.WORLD)
            checks.failures.append(f"rank {rank}: {world + 1} experts over {world} ranks")
        except ValueError as error:
            if "multiple of the number of ranks" not in str(error):
                checks.failures.append(f"rank {rank}: unexpected message {error}")
        checks.raise_if_any()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_one_process(world):
    mp.spawn(worker, args=(world, free_port()), nprocs=world, join=True)


def test_a_group_of_one_rank_is_the_plain_layer():
    """World size 1 with a real process group: same parameters, outputs and gradients."""
    dist.init_process_group(
        "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    try:
        x = torch.randn(SPLITS[1][0], D)
        projection = torch.linspace(-1, 1, x.numel()).view_as(x)
        for case in CASES:
            plain = make_layer(case, 0.75)
            grouped = make_layer(case, 0.75, dist.group.WORLD)
            assert grouped.group.world_size == 1
            want, want_grad = run_layer(plain, x, projection, 1.0, None, 0)
            got, got_grad = run_layer(grouped, x, projection, 1.0, None, 0)
            torch.testing.assert_close(got.output, want.output, atol=0, rtol=0)
            torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=0, rtol=0)
            torch.testing.assert_close(got_grad, want_grad, atol=0, rtol=0)
            for (key, p), q in zip(grouped.named_parameters(), plain.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0, msg=key)
    finally:
        dist.destroy_process_group()


def test_capacity_goes_to_ranks_in_token_order():
    # [W=2, E=3] pairs routed; capacity 4: rank 1 gets what rank 0 left.
    routed = torch.tensor([[3, 0, 5], [2, 1, 4]])
    kept = share_capacity(routed, 4)
    assert kept.tolist() == [[3, 0, 4], [1, 1, 0]]
    assert share_capacity(routed, None) is routed


def test_capacity_goes_to_first_choices_of_every_rank_first():
    # [W=2, C=2 slots, E=2]. Expert 0: first choices 2 (rank 0) and 1 (rank 1), then second
    # choices 2 and 3; capacity 4 keeps all three first choices, then rank 0's first second
    # choice. Expert 1: 1 and 0 first choices, 5 and 1 second: rank 0 takes 1 + 3.
    routed = torch.tensor([[[2, 1], [2, 5]], [[1, 0], [3, 1]]])
    assert share_capacity(routed, 4).tolist() == [[3, 4], [1, 0]]
    assert share_capacity(routed, None).tolist() == [[4, 6], [4, 1]]
    # One class is token order.
    flat = torch.tensor([[3, 0, 5], [2, 1, 4]])
    assert torch.equal(share_capacity(flat.unsqueeze(1), 4), share_capacity(flat, 4))


def test_per_expert_capacity_tensor_equals_one_capacity():
    expert_index = torch.randint(0, 4, (20, 2))
    one = plan_dispatch(expert_index, 4, 3)
    each = plan_dispatch(expert_index, 4, torch.full((4,), 3))
    assert torch.equal(one.pair_index, each.pair_index)
    assert torch.equal(one.rows_per_expert, each.rows_per_expert)
    # Different limits per expert keep the earliest pairs of each.
    limits = torch.tensor([0, 1, 2, 100])
    plan = plan_dispatch(expert_index, 4, limits)
    assert torch.equal(plan.rows_per_expert, torch.minimum(plan.routed_per_expert, limits))


def test_received_rows_are_put_in_expert_order():
    # Rows from rank 0: (e0), (e1, e1); from rank 1: (e0, e0). Expert-major: 0, 3, 4, 1, 2.
    order = _expert_major_order(torch.tensor([[1, 2], [2, 0]]))
    assert order.tolist() == [0, 3, 4, 1, 2]
    assert _expert_major_order(torch.tensor([[1, 2]])) is None  # one source rank
    assert _expert_major_order(torch.tensor([[1], [3]])) is None  # one expert per rank


def test_a_shard_of_experts_is_drawn_as_one_process_draws_it():
    torch.manual_seed(5)
    full = BatchedExperts(6, D, H, bias=True)
    after_full = torch.randn(3)  # what the global stream gives next
    torch.manual_seed(5)
    shard = BatchedExperts(6, D, H, bias=True, expert_range=(2, 4))
    after_shard = torch.randn(3)
    assert torch.equal(after_shard, after_full)  # later draws are the same at any W
    assert (shard.n_experts, shard.first_expert) == (2, 2)
    for key, value in shard.state_dict().items():
        assert torch.equal(value, full.state_dict()[key][2:4]), key
    # Experts are not copies of one another.
    assert not torch.equal(full.w_in[0], full.w_in[1])
    with pytest.raises(ValueError, match="expert range"):
        BatchedExperts(6, D, H, expert_range=(4, 7))
