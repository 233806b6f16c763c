"""A training run killed part-way, as a crash would kill it: for the tests that resume one."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pneumoseg.training.trainer import Trainer


def run_killed_at_update(monkeypatch, run: Callable[[], object], update: int = 3) -> None:
    """Call ``run()`` with the trainer's ``update``-th optimiser update raising KeyboardInterrupt (with two
    updates an epoch, update 3 is the first of epoch 2), then give the trainer back its own update."""
    calls = {"n": 0}
    original = Trainer._update

    def crash_at_the_update(self):
        calls["n"] += 1
        if calls["n"] == update:
            raise KeyboardInterrupt("killed")
        original(self)

    monkeypatch.setattr(Trainer, "_update", crash_at_the_update)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(Trainer, "_update", original)


def run_killed_in(monkeypatch, owner: object, name: str, run: Callable[[], object]) -> None:
    """Call ``run()`` with ``owner.name`` (a function it calls) raising KeyboardInterrupt, as a kill at that point
    would stop it, then give ``owner`` back its function."""

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as patch:
        patch.setattr(owner, name, killed)
        with pytest.raises(KeyboardInterrupt):
            run()
