"""Configuration of the LSTM language model (Shazeer et al. 2017, App. C.1) and the command-line
override syntax shared by every entry point (`--key=value`, type-checked against the dataclass).

Defaults are the paper's 1B Word values: width 512 everywhere, LSTM → MoE → LSTM, k = 4,
w_importance = w_load = 0.1, DropProb 0.1, a sampled softmax for the 793,471-word vocabulary.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

LAYER_KINDS = ("lstm", "moe", "ffn")
SOFTMAX_KINDS = ("full", "sampled")


@dataclass(frozen=True)
class LMConfig:
    """Embedding → layers → softmax, each layer `h + Dropout(f(h))` (App. C.1).

    layers: the stack between embedding and softmax, listed explicitly, e.g.
        ("lstm", "moe", "lstm") for the MoE models, ("lstm",) * 4 for 4xLSTM-512,
        ("lstm", "ffn", "lstm") for MoE-1-Wide / MoE-1-Deep, ("lstm",) for LSTM-2048-512.
    d_model: width of the embedding, of every layer's output and of the MoE's input/output.
    lstm_hidden: LSTM cells. When it differs from d_model the LSTM's output is projected down
        to d_model and fed back (the LSTMP of Sak et al. 2014), as in LSTM-2048-512 and MoE-143M.
    n_experts, expert_hidden, k, router, n_groups, k_groups, capacity_factor, w_importance,
        w_load, noise_epsilon: the MoE layer (lstm_moe.moe.MoEConfig).
    ffn_hidden: hidden widths of the dense "ffn" layer (one ReLU layer per entry): (4096,) is
        MoE-1-Wide, (1024,) * 4 is MoE-1-Deep.
    dropout: DropProb, applied to every layer's output except the softmax.
    softmax: "full", or "sampled" (importance sampling from a log-uniform proposal over the
        frequency-ranked vocabulary, Jozefowicz et al. 2016) for training; evaluation always uses
        the exact full softmax.
    n_samples: sampled-softmax candidates per training step.
    """

    vocab_size: int = 793_471
    layers: tuple[str, ...] = ("lstm", "moe", "lstm")
    d_model: int = 512
    lstm_hidden: int = 512
    n_experts: int = 32
    expert_hidden: int = 1024
    k: int = 4
    router: str = "noisy_topk"
    n_groups: int | None = None
    k_groups: int = 2
    capacity_factor: float | None = None
    w_importance: float = 0.1
    w_load: float = 0.1
    noise_epsilon: float = 1e-2
    ffn_hidden: tuple[int, ...] = (4096,)
    dropout: float = 0.1
    softmax: str = "sampled"
    n_samples: int = 8192

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "lstm_hidden", "n_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.layers or any(kind not in LAYER_KINDS for kind in self.layers):
            raise ValueError(f"layers must be a non-empty list of {LAYER_KINDS}, got {self.layers}")
        if "ffn" in self.layers and (not self.ffn_hidden or min(self.ffn_hidden) < 1):
            raise ValueError(f"ffn_hidden must list widths >= 1, got {self.ffn_hidden}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.softmax not in SOFTMAX_KINDS:
            raise ValueError(f"softmax must be one of {SOFTMAX_KINDS}, got {self.softmax!r}")
        if "moe" in self.layers:
            self.moe_config()  # validates the MoE fields with their own messages

    def moe_config(self):
        from lstm_moe.moe import MoEConfig

        return MoEConfig(
            d_model=self.d_model,
            n_experts=self.n_experts,
            expert_hidden=self.expert_hidden,
            k=self.k,
            router=self.router,
            n_groups=self.n_groups,
            k_groups=self.k_groups,
            capacity_factor=self.capacity_factor,
            w_importance=self.w_importance,
            w_load=self.w_load,
            noise_epsilon=self.noise_epsilon,
        )


# ----------------------------------------------------------------------------- overrides


def _parse_value(text: str, hint, name: str):
    """Convert a command-line string to the field's declared type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _parse_value(text, options[0], name)
    if origin is tuple:
        (item, *_rest) = typing.get_args(hint)
        parts = [p for p in text.replace(",", " ").split() if p]
        return tuple(_parse_value(p, item, name) for p in parts)
    if hint is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} expects true or false, got {text!r}")
    if hint in (int, float, str):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"--{name} expects {hint.__name__}, got {text!r}") from None
    raise TypeError(f"--{name}: unsupported field type {hint}")


def apply_overrides(config, overrides: dict[str, str]):
    """Return a copy of a config dataclass with string overrides parsed to each field's type.
    Unknown names raise a ValueError listing the valid ones."""
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for name, text in overrides.items():
        key = name.replace("-", "_")
        if key not in names:
            raise ValueError(
                f"unknown option --{name} for {type(config).__name__}; valid: {sorted(names)}"
            )
        changes[key] = _parse_value(text, hints[key], name) if isinstance(text, str) else text
    return dataclasses.replace(config, **changes)


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separate `--key=value` items (overrides) from the rest of a command line."""
    rest, overrides = [], {}
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            overrides[key] = value
        else:
            rest.append(arg)
    return rest, overrides


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(cls, data: dict):
    """Rebuild a config saved with config_to_dict (lists become tuples again)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    values = {}
    for key, value in data.items():
        if typing.get_origin(hints[key]) is tuple and value is not None:
            value = tuple(value)
        values[key] = value
    return cls(**values)


__all__ = [
    "LAYER_KINDS",
    "SOFTMAX_KINDS",
    "LMConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "split_overrides",
]
