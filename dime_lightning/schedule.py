"""The reference update schedule (docs/algorithm.md §4): ``utd`` critic updates per env step and one actor +
temperature update (with target-actor refresh) every ``policy_delay`` critic updates, counted globally."""

from __future__ import annotations

from dataclasses import dataclass

from dime_lightning.errors import BadInputError


@dataclass(frozen=True)
class UpdateSchedule:
    utd: int = 2
    policy_delay: int = 3

    def __post_init__(self) -> None:
        if self.utd < 1:
            raise BadInputError(f"UpdateSchedule: utd must be >= 1, got {self.utd}")
        if self.policy_delay < 1:
            raise BadInputError(f"UpdateSchedule: policy_delay must be >= 1, got {self.policy_delay}")

    def actor_due(self, critic_updates_done: int) -> bool:
        """Whether an actor update follows the critic update that brings the count to ``critic_updates_done``."""
        return critic_updates_done % self.policy_delay == 0

    def counts_after(self, env_steps: int) -> tuple[int, int]:
        """(critic updates, actor updates) after ``env_steps`` learning env steps."""
        critic = env_steps * self.utd
        return critic, critic // self.policy_delay
