"""Reading a run folder's metrics.jsonl, and comparing the logs of two runs step by step."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest

__all__ = ["CLOCK", "TOL", "assert_same_metrics", "read_metrics"]

# Agreement of runs that sum the same numbers in another order (other ranks, micro-batches).
TOL = dict(rel=1e-5, abs=1e-6)
# Entries that measure the machine, not the training: never compared.
CLOCK = frozenset({"kind", "elapsed", "tokens_per_s"})


def read_metrics(run: Path, kind: str = "train") -> list[dict]:
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == kind]


def assert_same_metrics(
    got_run: Path,
    want_run: Path,
    steps: Iterable[int],
    train_keys: Iterable[str] | None = None,
    valid_keys: Iterable[str] | None = ("valid_nll", "valid_tokens"),
    tol: dict | None = None,
) -> None:
    """The train and valid entries of both runs at `steps` are logged at the same steps and
    agree (to `tol`, TOL by default) on the given keys; None compares every key but the
    clock's, and requires both entries to have the same keys."""
    steps = set(steps)
    tol = TOL if tol is None else tol
    for kind, keys in (("train", train_keys), ("valid", valid_keys)):
        want = {e["step"]: e for e in read_metrics(want_run, kind) if e["step"] in steps}
        got = {e["step"]: e for e in read_metrics(got_run, kind) if e["step"] in steps}
        assert sorted(got) == sorted(want) and want, kind
        for step, entry in want.items():
            if keys is None:
                assert set(got[step]) == set(entry), (kind, step)
            for key in sorted(set(entry) - CLOCK) if keys is None else keys:
                assert got[step][key] == pytest.approx(entry[key], **tol), (kind, step, key)
