"""Experts as batched weights: E feed-forward networks with one ReLU hidden layer (Shazeer et
al. 2017, App. C.1) or GEGLU experts (Shazeer 2020), computed as grouped matrix products over
expert-contiguous rows: on the CPU one GEMM per expert on views of the rows (no copies), or one
bmm over a view when every expert has the same number of rows (the strictly balanced gate of
App. F in training); on CUDA in bf16 the grouped kernel; elsewhere a padded bmm; all behind
grouped_matmul. BatchedLinearExperts are E linear maps on the same product (the experts of a
routed projection: Switch's attention experts).

On the CPU the bias-free expert (the paper's) runs as one function, expert by expert: both
products and the ReLU of one expert while its rows are in cache, the ReLU and its derivative in
place, and every large buffer (hidden rows, outputs, gradients) on storage reused from step to
step (workspace.py), so that a step page-faults none of it in again. Whatever those fast paths
cannot do (biases, GEGLU, dropout between the two products) runs as grouped_matmul products with
the elementwise steps between them.

Index letters: N rows (tokens routed to experts, sorted by expert), E experts, D model width,
H expert hidden width, D' a linear expert's output width, C padded rows per expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .initializers import reduced_init_std, truncated_normal_
from .workspace import Workspace

# How the experts' weights are drawn (BatchedExperts.reset_parameters) and what they compute.
EXPERT_INITS = ("uniform", "trunc_normal")
EXPERT_ACTIVATIONS = ("relu", "geglu")

_GROUPED_MM_DTYPES = {
    # The CUDA kernel is written for bfloat16 (Hopper and newer); other dtypes use bmm below.
    # On the CPU, torch._grouped_mm copies its operands block by block (one clone per
    # expert and per operand, forward and backward); per-expert GEMMs (_PerExpertMatmul) on
    # views of the same memory are faster there, so the CPU never takes the grouped kernel.
    "cuda": (torch.bfloat16,),
}


def _grouped_mm_supported(rows: Tensor, weight: Tensor) -> bool:
    dtypes = _GROUPED_MM_DTYPES.get(rows.device.type, ())
    if rows.dtype not in dtypes or weight.dtype != rows.dtype:
        return False
    if not hasattr(torch, "_grouped_mm"):  # PyTorch before 2.8: the padded bmm instead
        return False
    if rows.device.type == "cuda" and torch.cuda.get_device_capability(rows.device) < (9, 0):
        return False
    # The kernel needs every row (of the inputs, the weights and their transposes in the
    # backward) to start on a 16-byte boundary.
    row_bytes = (rows.shape[-1] * rows.element_size(), weight.shape[-1] * weight.element_size())
    return all(n % 16 == 0 for n in row_bytes)


class _GroupedMatmul(torch.autograd.Function):
    """rows[offs[e-1]:offs[e]] @ weight[e] for every expert e, with an explicit backward:
    one grouped product for the input gradient and one for the weight gradient."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
        ctx.save_for_backward(rows, weight, offsets)
        return torch._grouped_mm(rows, weight, offs=offsets)  # [N, H]

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        rows, weight, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch._grouped_mm(grad_out, weight.transpose(1, 2), offs=offsets)
        if ctx.needs_input_grad[1]:
            # 2-D x 2-D with offsets along the reduction dim gives one [D, H] block per expert.
            # An expert that received no rows must get zeros: set them here rather than trust
            # every kernel to write empty blocks.
            grad_weight = torch._grouped_mm(rows.t(), grad_out, offs=offsets)  # [E, D, H]
            counts = torch.diff(offsets, prepend=offsets.new_zeros(1))  # [E]
            grad_weight = grad_weight.masked_fill((counts == 0)[:, None, None], 0.0)
        return grad_rows, grad_weight, None


class _PerExpertMatmul(torch.autograd.Function):
    """rows[start_e : start_e + n_e] @ weight[e] for every expert e with n_e > 0: one GEMM per
    expert on contiguous views, written straight into the output (no copy of any operand),
    and the same for both gradients. An expert with no rows costs nothing but the zeroing of
    its block of the weight gradient (its true gradient); every other block is written once,
    so the gradient is never zero-filled or masked as a whole."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, counts: list[int]) -> Tensor:
        ctx.save_for_backward(rows, weight)
        ctx.counts = counts
        out = rows.new_empty(rows.shape[0], weight.shape[-1])  # [N, H]
        start = 0
        for expert, n in enumerate(counts):
            if n:
                torch.mm(rows[start : start + n], weight[expert], out=out[start : start + n])
            start += n
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        rows, weight = ctx.saved_tensors
        counts = ctx.counts
        grad_out = grad_out.contiguous()
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_rows = rows.new_empty(rows.shape)  # [N, D]
        if ctx.needs_input_grad[1]:
            grad_weight = weight.new_empty(weight.shape)  # [E, D, H]
        start = 0
        for expert, n in enumerate(counts):
            block = slice(start, start + n)
            if grad_rows is not None and n:
                torch.mm(grad_out[block], weight[expert].t(), out=grad_rows[block])
            if grad_weight is not None:
                if n:
                    torch.mm(rows[block].t(), grad_out[block], out=grad_weight[expert])
                else:
                    grad_weight[expert].zero_()
            start += n
        return grad_rows, grad_weight, None


def _padded_slots(rows_per_expert: Tensor, n_rows: int) -> tuple[Tensor, int]:
    """The place of each row in a zero-padded [E, C] batch, flat ([N] int64), and C: the
    busiest expert's count."""
    n_experts = rows_per_expert.shape[0]
    capacity = int(rows_per_expert.max()) if n_rows else 0
    expert_of_row = torch.repeat_interleave(
        torch.arange(n_experts, device=rows_per_expert.device), rows_per_expert, output_size=n_rows
    )  # [N]
    starts = torch.cumsum(rows_per_expert, 0) - rows_per_expert  # [E]
    slot_of_row = torch.arange(n_rows, device=rows_per_expert.device) - starts[expert_of_row]
    return expert_of_row * capacity + slot_of_row, capacity


def _padded_feed_forward(
    rows: Tensor, w_in: Tensor, w_out: Tensor, rows_per_expert: Tensor
) -> Tensor:
    """The expert feed-forward as two bmm over one zero-padded [E, C, D] batch: a fixed dozen
    operations whatever E, for products too small for per-expert GEMMs to pay their call
    overhead. Padding rows are zero, so they stay zero through the bias-free expert."""
    n_experts, n_rows = w_in.shape[0], rows.shape[0]
    flat_slot, capacity = _padded_slots(rows_per_expert, n_rows)
    padded = rows.new_zeros(n_experts * capacity, rows.shape[1])
    padded = padded.index_copy(0, flat_slot, rows).view(n_experts, capacity, rows.shape[1])
    hidden = torch.bmm(padded, w_in).relu_()  # [E, C, H]; bmm keeps no output for its backward
    out = torch.bmm(hidden, w_out)  # [E, C, D']
    return out.reshape(n_experts * capacity, w_out.shape[-1]).index_select(0, flat_slot)


def _padded_bmm(rows: Tensor, weight: Tensor, rows_per_expert: Tensor) -> Tensor:
    """Same product as the grouped kernel, for dtypes and devices it does not cover: scatter
    rows into a zero-padded [E, C, D] batch, one bmm, gather back. Loop-free, but it pays for
    padding to the busiest expert."""
    n_experts = weight.shape[0]
    flat_slot, capacity = _padded_slots(rows_per_expert, rows.shape[0])
    padded = rows.new_zeros(n_experts * capacity, rows.shape[1])
    padded = padded.index_copy(0, flat_slot, rows).view(n_experts, capacity, rows.shape[1])
    out = torch.bmm(padded, weight)  # [E, C, H]
    return out.reshape(n_experts * capacity, weight.shape[-1]).index_select(0, flat_slot)


# Per-expert products (rows × D × H multiply-adds) up to which the CPU takes one bmm for equal
# counts. Measured on 2 cores, forward + backward, E = 32: at 160 × 64 × 128 the bmm takes
# 1.2 ms against 2.9 ms for E GEMMs, at 40 × 64 × 128 0.44 against 1.64 ms; at 512 × 512 ×
# 1024 the two are even (279 and 289 ms), so large products keep the GEMMs.
_BMM_MAX_MACS_PER_EXPERT = 1 << 24
# Mean multiply-adds of one expert's product (rows × D × H) up to which the CPU's expert
# feed-forward takes the padded bmm, whose fixed dozen calls then beat 2·E GEMMs and their
# gradients. Measured on 2 cores, forward + backward, E = 32, counts of uniform routing: at
# 80 × 64 × 128 (the demo LM) padded 3.2 ms against 5.0 ms per expert; even at 80 × 64 × 256;
# at 320 × 256 × 512 padded 34 against 28 ms.
_PADDED_MAX_MACS_PER_EXPERT = 1 << 20


def _balanced_bmm(rows: Tensor, weight: Tensor, rows_each: int) -> Tensor:
    """Every expert has rows_each rows: the rows are already an [E, rows_each, D] batch, so
    the product is one bmm on a view (no padding, no copy)."""
    n_experts = weight.shape[0]
    batch = rows.reshape(n_experts, rows_each, rows.shape[-1])  # [E, C, D]
    return torch.bmm(batch, weight).reshape(n_experts * rows_each, weight.shape[-1])  # [N, H]


def _takes_balanced_bmm(counts: list[int], weight: Tensor) -> bool:
    """Every expert has the same number of rows, and each expert's product is small."""
    if not counts or counts[0] == 0 or min(counts) != max(counts):
        return False
    return counts[0] * weight.shape[1] * weight.shape[2] <= _BMM_MAX_MACS_PER_EXPERT


def grouped_matmul(rows: Tensor, weight: Tensor, rows_per_expert: Tensor) -> Tensor:
    """Multiply each expert's contiguous block of rows by that expert's weight.

    rows: [N, D], sorted so that expert e's rows follow expert e-1's;
    weight: [E, D, H]; rows_per_expert: [E] int64 summing to N. Returns [N, H].
    Under autocast both operands are cast to the autocast dtype (bf16 experts with float32
    master weights), and the product runs in that dtype.
    """
    if torch.is_autocast_enabled(rows.device.type):
        dtype = torch.get_autocast_dtype(rows.device.type)
        rows, weight = rows.to(dtype), weight.to(dtype)
    if _grouped_mm_supported(rows, weight):
        offsets = torch.cumsum(rows_per_expert, 0, dtype=torch.int32)  # [E] end of each block
        return _GroupedMatmul.apply(rows, weight, offsets)
    if rows.device.type == "cpu":
        counts = rows_per_expert.tolist()
        if _takes_balanced_bmm(counts, weight):
            return _balanced_bmm(rows, weight, counts[0])
        return _PerExpertMatmul.apply(rows, weight, counts)
    return _padded_bmm(rows, weight, rows_per_expert)


class _PerExpertFeedForward(torch.autograd.Function):
    """ReLU(rows_e · w_in[e]) · w_out[e] for every expert e with rows, on the CPU: per expert,
    two GEMMs on views with the ReLU in place between them; the backward per expert too, its
    hidden gradient in one reused block and the ReLU's derivative applied in place. Outputs and
    gradients are written once, block by block, on workspace storage; an expert with no rows
    costs nothing but the zeroing of its blocks of the weight gradients (their true value)."""

    @staticmethod
    def forward(
        ctx, rows: Tensor, w_in: Tensor, w_out: Tensor, counts: list[int], workspace: Workspace
    ) -> Tensor:
        n_rows = rows.shape[0]
        hidden = workspace.empty("hidden", (n_rows, w_in.shape[-1]), rows)  # [N, H]
        out = workspace.empty("output", (n_rows, w_out.shape[-1]), rows)  # [N, D]
        start = 0
        for expert, n in enumerate(counts):
            if n:
                block = slice(start, start + n)
                torch.mm(rows[block], w_in[expert], out=hidden[block])
                hidden[block].relu_()
                torch.mm(hidden[block], w_out[expert], out=out[block])
            start += n
        ctx.save_for_backward(rows, w_in, w_out, hidden)
        ctx.counts, ctx.workspace = counts, workspace
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        rows, w_in, w_out, hidden = ctx.saved_tensors
        counts, workspace = ctx.counts, ctx.workspace
        grad_out = grad_out.contiguous()
        need_rows, need_in, need_out = ctx.needs_input_grad[:3]
        grad_rows = workspace.empty("grad_rows", rows.shape, rows) if need_rows else None
        grad_in = workspace.empty("grad_w_in", w_in.shape, w_in) if need_in else None
        grad_out_w = workspace.empty("grad_w_out", w_out.shape, w_out) if need_out else None
        # One expert's hidden gradient at a time, in the first rows of one block.
        widest = max(counts, default=0)
        grad_hidden = workspace.empty("grad_hidden", (widest, w_in.shape[-1]), rows)  # [n, H]
        relu_backward = torch.ops.aten.threshold_backward.grad_input  # in place, with out=
        start = 0
        for expert, n in enumerate(counts):
            if not n:
                for grad in (grad_in, grad_out_w):
                    if grad is not None:
                        grad[expert].zero_()
                continue
            block = slice(start, start + n)
            start += n
            if grad_out_w is not None:
                torch.mm(hidden[block].t(), grad_out[block], out=grad_out_w[expert])
            if not (need_rows or need_in):
                continue
            grad_h = grad_hidden[:n]  # [n, H]
            torch.mm(grad_out[block], w_out[expert].t(), out=grad_h)
            # ReLU' from its output: 1 where the output is positive, as autograd's ReLU.
            relu_backward(grad_h, hidden[block], 0, grad_input=grad_h)
            if grad_in is not None:
                torch.mm(rows[block].t(), grad_h, out=grad_in[expert])
            if grad_rows is not None:
                torch.mm(grad_h, w_in[expert].t(), out=grad_rows[block])
        return grad_rows, grad_in, grad_out_w, None, None


def expert_feed_forward(
    rows: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    rows_per_expert: Tensor,
    workspace: Workspace | None = None,
) -> Tensor:
    """ReLU(rows_e · w_in[e]) · w_out[e] for each expert's contiguous block of rows (bias-free
    experts, App. C.1): rows [N, D] expert-contiguous, w_in [E, D, H], w_out [E, H, D'],
    rows_per_expert [E] int64. Returns [N, D'].

    The CPU takes the fused per-expert function above, except for small products: where every
    expert has the same small number of rows, one bmm per product on a view; where the mean
    product is tiny, two bmm over a padded batch (_padded_feed_forward). Every other case is
    two grouped_matmul products with the ReLU between them.
    """
    cpu = rows.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
    if cpu and w_in.dtype == rows.dtype == w_out.dtype:
        counts = rows_per_expert.tolist()
        mean_product = rows.shape[0] * w_in.shape[1] * w_in.shape[2] / max(1, len(counts))
        if _takes_balanced_bmm(counts, w_in):
            pass  # grouped_matmul's one bmm per product, below
        elif mean_product <= _PADDED_MAX_MACS_PER_EXPERT:
            return _padded_feed_forward(rows, w_in, w_out, rows_per_expert)
        else:
            workspace = Workspace() if workspace is None else workspace
            return _PerExpertFeedForward.apply(rows, w_in, w_out, counts, workspace)
    hidden = grouped_matmul(rows, w_in, rows_per_expert).relu_()  # no product keeps its output
    return grouped_matmul(hidden, w_out, rows_per_expert)


def expert_generators(
    first_expert: int, n_held: int, device: torch.device
) -> list[tuple[int, torch.Generator]]:
    """(local index, generator) for each of the n_held experts from global id first_expert:
    one draw of the global random stream seeds them all, expert e from seed + e. So a shard
    draws exactly what one process draws for those experts (on the same device type: CPU and
    CUDA generators differ), and the global stream moves on by one draw at any number of ranks.
    """
    base_seed = int(torch.randint(2**62, (1,), device="cpu"))  # the one global draw
    return [
        (local, torch.Generator(device).manual_seed(base_seed + first_expert + local))
        for local in range(n_held)
    ]


class BatchedExperts(nn.Module):
    """E experts, stored as [E, D, H] and [E, H, D]:
    "relu": `x -> W_out·ReLU(W_in·x + b_in) + b_out` (App. C.1);
    "geglu": `x -> W_out·(GELU(W_gate·x) ⊙ W_in·x)` (Shazeer 2020, "GLU Variants Improve
    Transformer", §2, FFN_GEGLU; the T5.1.1 and ST-MoE feed-forward), with a third tensor
    w_gate [E, D, H] and no biases (the paper's FFN variants have none). GELU is the exact
    x·Φ(x) the paper defines (Mesh TensorFlow's uses the tanh approximation).

    expert_range: [first, last) of the experts this module holds (one rank's shard under
    expert parallelism), None for all n_experts. init: "uniform" draws each weight like an
    nn.Linear (uniform in ±1/√fan_in, biases too); "trunc_normal" is the Switch Transformer's
    reduced initialisation (§2.4): a normal truncated at two standard deviations with standard
    deviation sqrt(init_scale / fan_in) after the truncation (init_scale 0.1 where the usual
    variance scaling has 1.0), biases zero. Either way each expert is drawn from a generator of
    its own, seeded from one draw of the global random stream plus its global id: a shard holds
    exactly the values one process draws for those experts (built on the same device type: CPU
    and CUDA generators differ), the global stream moves on by that one draw at any number of
    ranks, and no rank ever materialises experts it does not hold.

    dropout: probability of zeroing each hidden activation in training (Switch §2.4, Table 4:
    "expert dropout", larger than the model's own); 0, or evaluation mode, computes exactly
    what the experts compute without it.
    """

    # Every tensor registered here is [E/W, ...], one block per expert: expert parallelism
    # shards it instead of replicating it (parallel.expert_tensor_names). That includes the
    # GEGLU gate w_gate, and a tensor a subclass adds.
    holds_expert_shard = True

    def __init__(
        self,
        n_experts: int,
        d_model: int,
        expert_hidden: int,
        bias: bool = True,
        expert_range: tuple[int, int] | None = None,
        *,
        init: str = "uniform",
        init_scale: float = 0.1,
        dropout: float = 0.0,
        activation: str = "relu",
    ):
        super().__init__()
        if expert_hidden < 1:
            raise ValueError(f"expert_hidden must be >= 1, got {expert_hidden}")
        if init not in EXPERT_INITS:
            raise ValueError(f"init must be one of {EXPERT_INITS}, got {init!r}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if activation not in EXPERT_ACTIVATIONS:
            raise ValueError(f"activation must be one of {EXPERT_ACTIVATIONS}, got {activation!r}")
        if activation == "geglu" and bias:
            raise ValueError("GEGLU experts have no biases: set bias=False (expert_bias)")
        first, last = (0, n_experts) if expert_range is None else expert_range
        if not 0 <= first < last <= n_experts:
            raise ValueError(f"expert range [{first}, {last}) is not in [0, {n_experts})")
        held = last - first
        self.n_experts, self.first_expert = held, first
        self.d_model, self.expert_hidden = d_model, expert_hidden
        self.init, self.init_scale = init, init_scale
        self.dropout, self.activation = dropout, activation
        self.w_in = nn.Parameter(torch.empty(held, d_model, expert_hidden))
        self.w_out = nn.Parameter(torch.empty(held, expert_hidden, d_model))
        self.b_in = nn.Parameter(torch.empty(held, expert_hidden)) if bias else None
        self.b_out = nn.Parameter(torch.empty(held, d_model)) if bias else None
        geglu = activation == "geglu"
        self.w_gate = nn.Parameter(torch.empty(held, d_model, expert_hidden)) if geglu else None
        self.workspace = Workspace()  # reused CPU buffers of the forward and backward
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        device = self.w_in.device
        if device.type == "meta":  # shapes only (e.g. counting parameters): nothing to draw
            return
        for local, generator in expert_generators(self.first_expert, self.n_experts, device):
            # One order of draws per expert: w_in, w_out, the biases, then the gate, so that a
            # ReLU expert draws what it always drew.
            if self.init == "uniform":
                self._draw_uniform(local, generator)
            else:
                self._draw_truncated_normal(local, generator)

    def _draw_uniform(self, local: int, generator: torch.Generator) -> None:
        bound_in, bound_out = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.expert_hidden)
        self.w_in[local].uniform_(-bound_in, bound_in, generator=generator)
        self.w_out[local].uniform_(-bound_out, bound_out, generator=generator)
        if self.b_in is not None:
            self.b_in[local].uniform_(-bound_in, bound_in, generator=generator)
            self.b_out[local].uniform_(-bound_out, bound_out, generator=generator)
        if self.w_gate is not None:
            self.w_gate[local].uniform_(-bound_in, bound_in, generator=generator)

    def _draw_truncated_normal(self, local: int, generator: torch.Generator) -> None:
        # Switch §2.4: std sqrt(s / fan_in), fan_in = D for the products of x, H for W_out.
        std_in = reduced_init_std(self.init_scale, self.d_model)
        std_out = reduced_init_std(self.init_scale, self.expert_hidden)
        truncated_normal_(self.w_in[local], std_in, generator)
        truncated_normal_(self.w_out[local], std_out, generator)
        if self.b_in is not None:
            self.b_in[local].zero_()
            self.b_out[local].zero_()
        if self.w_gate is not None:
            truncated_normal_(self.w_gate[local], std_in, generator)

    def forward(self, rows: Tensor, rows_per_expert: Tensor) -> Tensor:
        """rows: [N, D] expert-contiguous; rows_per_expert: [E] int64. Returns [N, D]."""
        dropout = self.dropout if self.training else 0.0
        if self.b_in is None and self.activation == "relu" and dropout == 0:
            return expert_feed_forward(rows, self.w_in, self.w_out, rows_per_expert, self.workspace)
        # The fused paths compute both products in one go: dropout, biases or a gate between
        # them take grouped products and elementwise steps instead.
        hidden = grouped_matmul(rows, self.w_in, rows_per_expert)  # [N, H]
        if self.b_in is not None:
            expert_of_row = torch.repeat_interleave(
                torch.arange(self.n_experts, device=rows.device),
                rows_per_expert,
                output_size=rows.shape[0],
            )  # [N]
            hidden = hidden + self.b_in.index_select(0, expert_of_row).to(hidden.dtype)
        if self.w_gate is not None:
            gate = grouped_matmul(rows, self.w_gate, rows_per_expert)  # [N, H]
            hidden = F.gelu(gate) * hidden  # GELU(x·W_gate) ⊙ x·W_in (Shazeer 2020, §2)
        else:
            hidden = hidden.relu_()  # no product or sum above keeps its output for the backward
        if dropout:
            hidden = F.dropout(hidden, dropout, training=True)  # [N, H]
        out = grouped_matmul(hidden, self.w_out, rows_per_expert)  # [N, D]
        if self.b_out is not None:
            out = out + self.b_out.index_select(0, expert_of_row).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (
            f"n_experts={self.n_experts}, d_model={self.d_model}, "
            f"expert_hidden={self.expert_hidden}, bias={self.b_in is not None}, "
            f"activation={self.activation}, init={self.init}, dropout={self.dropout}"
        )


class BatchedLinearExperts(nn.Module):
    """E bias-free linear maps stored as one weight [E, D, D']: expert e computes x·W[e], all of
    them as one grouped_matmul over expert-contiguous rows. The experts of a routed projection
    (projection.py), such as Switch's attention experts, whose experts hold the query, key and
    value projections (Fedus et al. 2021, App. A, Figure 10, Table 10).

    expert_range: [first, last) of the experts held (one rank's shard), None for all n_experts;
    each expert is drawn from its own generator (expert_generators), so a shard holds exactly
    what one process draws for those experts. init: "uniform" draws each weight in ±1/√D, as
    nn.Linear draws a dense projection (one expert starts as the dense layer it replaces
    would); "trunc_normal" is Switch's reduced initialisation (§2.4), standard deviation
    sqrt(init_scale / D) after the cut at ±2σ.

    float32: under autocast, compute the product in float32 (or the weight's dtype if wider)
    instead of the autocast dtype. Switch Table 10 trained its attention experts in float32:
    in bfloat16 they diverged. False takes the autocast dtype, as the feed-forward experts do.
    Outside autocast the product runs in the rows' own dtype (the weight's).
    """

    # The weight is [E/W, D, D'], one block per expert: expert parallelism shards it instead of
    # replicating it (parallel.expert_tensor_names).
    holds_expert_shard = True

    def __init__(
        self,
        n_experts: int,
        d_model: int,
        d_out: int,
        expert_range: tuple[int, int] | None = None,
        *,
        init: str = "uniform",
        init_scale: float = 0.1,
        float32: bool = True,
    ):
        super().__init__()
        if d_model < 1 or d_out < 1:
            raise ValueError(f"d_model and d_out must be >= 1, got {d_model} and {d_out}")
        if init not in EXPERT_INITS:
            raise ValueError(f"init must be one of {EXPERT_INITS}, got {init!r}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        first, last = (0, n_experts) if expert_range is None else expert_range
        if not 0 <= first < last <= n_experts:
            raise ValueError(f"expert range [{first}, {last}) is not in [0, {n_experts})")
        self.n_experts, self.first_expert = last - first, first
        self.d_model, self.d_out = d_model, d_out
        self.init, self.init_scale, self.float32 = init, init_scale, float32
        self.weight = nn.Parameter(torch.empty(last - first, d_model, d_out))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        device = self.weight.device
        if device.type == "meta":  # shapes only (e.g. counting parameters): nothing to draw
            return
        for local, generator in expert_generators(self.first_expert, self.n_experts, device):
            if self.init == "uniform":
                bound = 1 / math.sqrt(self.d_model)
                self.weight[local].uniform_(-bound, bound, generator=generator)
            else:
                std = reduced_init_std(self.init_scale, self.d_model)
                truncated_normal_(self.weight[local], std, generator)

    def forward(self, rows: Tensor, rows_per_expert: Tensor) -> Tensor:
        """rows: [N, D] expert-contiguous; rows_per_expert: [E] int64. Returns [N, D'], float32
        under autocast when self.float32."""
        device = rows.device.type
        if self.float32 and torch.is_autocast_enabled(device):
            dtype = torch.promote_types(self.weight.dtype, torch.float32)
            with torch.autocast(device_type=device, enabled=False):
                return grouped_matmul(rows.to(dtype), self.weight.to(dtype), rows_per_expert)
        return grouped_matmul(rows, self.weight, rows_per_expert)

    def extra_repr(self) -> str:
        return (
            f"n_experts={self.n_experts}, d_model={self.d_model}, d_out={self.d_out}, "
            f"init={self.init}, float32={self.float32}"
        )
