"""Hooks into the engine's speculative steps (single and batched) for fault and timing tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import decoding.stepper as stepper_module
from decoding.speculative import SequenceState


def before_steps(monkeypatch: pytest.MonkeyPatch, hook: Callable[[list[SequenceState]], None]):
    """Call ``hook(states)`` ahead of every step the engine takes, one request or a batch
    (a group of plain steps counts as one).

    A hook that raises for one request fails a batched step; the engine then steps that batch's
    requests one by one, where the hook fails only that request.
    """
    real_single = stepper_module.speculative_step
    real_batch = stepper_module.speculative_step_batch
    real_plain = stepper_module.plain_steps
    real_plain_batch = stepper_module.plain_steps_batch

    def single(state, gamma):
        hook([state])
        return real_single(state, gamma)

    def batch(states, gammas, draft, target, choose=None):
        hook(states)
        return real_batch(states, gammas, draft, target, choose)

    def plain(state, steps):
        hook([state])
        return real_plain(state, steps)

    def plain_batch(states, steps, target):
        hook(states)
        return real_plain_batch(states, steps, target)

    monkeypatch.setattr(stepper_module, "speculative_step", single)
    monkeypatch.setattr(stepper_module, "speculative_step_batch", batch)
    monkeypatch.setattr(stepper_module, "plain_steps", plain)
    monkeypatch.setattr(stepper_module, "plain_steps_batch", plain_batch)
