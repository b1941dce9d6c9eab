"""Schedules. The reference update schedule (docs/algorithm.md §4): ``utd`` critic updates per env step and one
actor + temperature update (with target-actor refresh) every ``policy_delay`` critic updates, counted globally.
And the one env-step cadence of evaluations, checkpoints and throughput records: ``due``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UpdateSchedule:
    """The counts of ``UpdateSettings.utd`` and ``policy_delay`` (validated there)."""

    utd: int = 2
    policy_delay: int = 3

    def actor_due(self, critic_updates_done: int) -> bool:
        """Whether an actor update follows the critic update that brings the count to ``critic_updates_done``."""
        return critic_updates_done % self.policy_delay == 0


def due(last: int, now: int, every: int) -> bool:
    """Whether an every-``every``-env-steps event is due at env step ``now``, its last one having been at ``last``:
    a multiple of ``every`` lies in (last, now]. Events fall on multiples of ``every`` whatever the step a run
    (re)started at, and at most one is due however many env steps a batch adds.

    last: env step of the last event (or of the start).
    now: the current env step.
    every: the cadence in env steps, >= 1."""
    return now // every > last // every
