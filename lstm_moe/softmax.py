"""The output layer: an exact softmax for evaluation and small vocabularies, and an importance-
sampled softmax for training with large ones (the paper trains its 793,471-word softmax "using
importance sampling similarly to the models in (Jozefowicz et al., 2016)", App. C.1).

Sampled softmax: per training step, S candidate words are drawn (with replacement) from a
log-uniform proposal over the frequency-ranked vocabulary, Q(c) = log((c+2)/(c+1)) / log(V+1)
(data_prep.vocab assigns ids by decreasing frequency, so this is a Zipf-shaped guess of the
unigram distribution). `<S>` (id 0) is never a target but stays in the proposal: its samples
are what teach the model to give it no mass, which the exact softmax of evaluation counts. Each
row's loss is -log of a softmax over {its target} ∪ {candidates}: the target's logit as it
is, each candidate's corrected by -log(S·Q(c)) (the expected number of times c is drawn), and
candidates equal to the target removed ("accidental hits"). The denominator is then
e^{l_t} + Σ_s e^{l_s} / (S·Q(s)) over the other words, an unbiased importance-sampling estimate
of the partition function, exact term for the target included, so the loss converges to the
full softmax's as S grows. (Correcting the target's logit as well, as implementations that
draw candidates without repeats do, would scale the other words' mass by S·Q(target) when
candidates are drawn with repeats, as here.) Evaluation never uses it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Rows of logits materialised at once by the exact softmax: bounds its memory at
# _LOGITS_PER_CHUNK floats whatever the vocabulary size (793k words x 64 rows = 200 MB).
_LOGITS_PER_CHUNK = 1 << 25


def log_uniform_log_prob(ids: Tensor, vocab_size: int) -> Tensor:
    """log Q(c) of the log-uniform proposal, for ids: [...] int64."""
    ids = ids.to(torch.float64)
    q = torch.log1p(1.0 / (ids + 1.0)) / math.log(vocab_size + 1.0)
    return q.log().to(torch.float32)


def sample_log_uniform(
    n_samples: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Draw ids ~ Q by inverting its CDF: P(id < c) = log(c+1) / log(V+1)."""
    u = torch.rand(n_samples, generator=generator, device=device, dtype=torch.float64)
    ids = torch.floor(torch.exp(u * math.log(vocab_size + 1.0))).long() - 1
    return ids.clamp_(0, vocab_size - 1)


class Softmax(nn.Module):
    """Output embedding [V, D] and bias [V]. `nll` is exact; `sampled_nll` estimates it."""

    def __init__(self, d_model: int, vocab_size: int, n_samples: int = 8192):
        super().__init__()
        self.vocab_size, self.n_samples = vocab_size, n_samples
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.normal_(self.weight, std=1 / math.sqrt(d_model))

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden: [N, D] -> [N, V] in float32 (under autocast too), or wider for a wider
        model (float64 ones are compared against references to 1e-10)."""
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(hidden.to(dtype), self.weight.to(dtype), self.bias.to(dtype))

    def log_probs(self, hidden: Tensor) -> Tensor:
        """The full log-softmax: hidden [N, D] -> [N, V] float32 (wider for a wider model),
        for losses against a whole distribution (distillation: switch.distill). Materialises
        [N, V]: callers chunk the rows by rows_per_chunk."""
        return torch.log_softmax(self.logits(hidden), dim=-1)

    @property
    def rows_per_chunk(self) -> int:
        """Rows whose [rows, V] logits fit in the exact softmax's bound (_LOGITS_PER_CHUNK)."""
        return max(1, _LOGITS_PER_CHUNK // self.vocab_size)

    def nll(self, hidden: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Exact negative log-likelihood per row. hidden: [N, D]; targets: [N] -> [N] float32.
        Computed in row chunks so that the [N, V] logits never exist at once. label_smoothing
        ε: the cross entropy against (1 - ε)·onehot + ε/V instead (Szegedy et al. 2016)."""
        chunk = max(1, _LOGITS_PER_CHUNK // self.vocab_size)
        pieces = [
            F.cross_entropy(self.logits(h), t, reduction="none", label_smoothing=label_smoothing)
            for h, t in zip(hidden.split(chunk), targets.split(chunk), strict=True)
        ]
        return torch.cat(pieces) if pieces else hidden.new_zeros(0)

    def sampled_nll(self, hidden: Tensor, targets: Tensor, generator=None) -> Tensor:
        """Importance-sampled negative log-likelihood per row (see the module docstring).
        hidden: [N, D]; targets: [N] -> [N] float32. Falls back to the exact loss when the
        vocabulary is not larger than the number of samples."""
        if self.vocab_size <= self.n_samples:
            return self.nll(hidden, targets)
        samples = sample_log_uniform(
            self.n_samples, self.vocab_size, generator, hidden.device
        )  # [S]
        with torch.autocast(hidden.device.type, enabled=False):
            return self._sampled_nll(hidden.float(), targets, samples)

    def _sampled_nll(self, hidden: Tensor, targets: Tensor, samples: Tensor) -> Tensor:
        """hidden: [N, D] float32; targets: [N]; samples: [S] candidate ids, drawn from Q with
        repeats. Returns [N]: log(e^{l_t} + Σ_{s ≠ t} e^{l_s} / (S·Q(s))) - l_t."""
        n_samples = samples.numel()
        log_expected = math.log(n_samples) + log_uniform_log_prob(samples, self.vocab_size)  # [S]
        true_logits = (hidden * self.weight[targets].float()).sum(-1) + self.bias[targets]  # [N]
        sample_logits = F.linear(hidden, self.weight[samples].float(), self.bias[samples])  # [N, S]
        sample_logits = sample_logits - log_expected
        hit = targets[:, None] == samples[None, :]  # [N, S]
        sample_logits = sample_logits.masked_fill(hit, float("-inf"))
        logits = torch.cat([true_logits[:, None], sample_logits], dim=1)  # [N, 1 + S]
        return torch.logsumexp(logits, dim=1) - true_logits
