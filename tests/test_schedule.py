"""docs/algorithm.md §8 item 11: the update-schedule counts."""

import pytest

from dime_lightning.errors import BadInputError
from dime_lightning.schedule import UpdateSchedule, due
from dime_lightning.update_settings import UpdateSettings


def simulate(schedule: UpdateSchedule, env_steps: int) -> tuple[int, int, list[int]]:
    critic_updates, actor_at = 0, []
    for _ in range(env_steps):
        for _ in range(schedule.utd):
            critic_updates += 1
            if schedule.actor_due(critic_updates):
                actor_at.append(critic_updates)
    return critic_updates, len(actor_at), actor_at


def test_reference_schedule_counts():
    schedule = UpdateSchedule(utd=2, policy_delay=3)
    critic, actor, actor_at = simulate(schedule, 3)
    assert (critic, actor) == (6, 2)
    assert actor_at == [3, 6]  # the counter is global over critic updates, not per env step
    assert simulate(schedule, 1000)[:2] == (2000, 666)


def test_an_env_step_event_falls_on_the_multiples_whatever_the_start():
    # a resumed run at 90,548 evaluating every 4,000: next at 92,000, then 96,000, once each
    steps = range(90_549, 96_001)
    last, events = 90_548, []
    for now in steps:
        if due(last, now, 4_000):
            events.append(now)
            last = now
    assert events == [92_000, 96_000]
    assert due(0, 250, 100) and not due(150, 199, 100)  # a batch of many steps: due once; within a period: not


@pytest.mark.parametrize(("utd", "delay"), [(0, 3), (2, 0)])
def test_invalid_schedule(utd, delay):
    with pytest.raises(BadInputError, match="model.update.utd" if utd < 1 else "model.update.policy_delay"):
        UpdateSettings(utd=utd, policy_delay=delay)
