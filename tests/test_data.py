"""ReplayDataModule: warm-up, batches per env step, what the buffer stores, episode bookkeeping."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dime_lightning.actor import DiffusionActor
from dime_lightning.collection import CollectionPolicy
from dime_lightning.data import ReplayDataModule


def make_data(**overrides) -> ReplayDataModule:
    kwargs = {"env_id": "Pendulum-v1", "total_env_steps": 230, "learning_starts": 100, "buffer_size": 1000,
              "batch_size": 8, "utd": 2, "seed": 0, **overrides}
    data = ReplayDataModule(**kwargs)
    actor = DiffusionActor(data.obs_dim, data.action_dim, num_steps=2, hidden_dim=8, time_features=4,
                           time_hidden_dim=8)
    data.trainer = SimpleNamespace(lightning_module=SimpleNamespace(actor=actor), global_rank=0, world_size=1)
    data.setup("fit")
    return data


def test_one_batch_per_env_step_with_warmup_then_utd_minibatches():
    data = make_data()
    batches = [data.on_before_batch_transfer(token, 0) for token in data.train_dataloader()]
    assert [b.env_steps for b in batches] == list(range(1, 231))
    assert all(b.sample is None for b in batches[:100])
    assert all(b.sample is not None and b.sample.batch_size == torch.Size([2, 8]) for b in batches[100:])
    sample = batches[-1].sample
    assert sample["action"].abs().max() <= 1.0  # the buffer stores [-1, 1] actions, not env units
    assert sample["next", "reward"].shape == (2, 8, 1) and sample["next", "terminated"].dtype == torch.bool
    stored = {"observation", "action", ("next", "observation"), ("next", "reward"), ("next", "terminated")}
    assert set(sample.keys(True, True)) - {"index"} == stored
    assert len(data._buffer) == 230
    assert list(data.train_dataloader()) == []  # nothing left once total_env_steps are collected
    episodes = data.pop_finished_episodes()
    assert [(e.env_steps, e.length) for e in episodes] == [(200, 200)]  # Pendulum truncates at 200
    assert data.pop_finished_episodes() == []
    data.teardown("fit")


def test_collection_policy_is_uniform_during_warmup_then_the_actor():
    actor = DiffusionActor(3, 2, num_steps=2, hidden_dim=8, time_features=4, time_hidden_dim=8)
    policy = CollectionPolicy(actor, action_dim=2, seed=0)
    random_actions = torch.stack([policy(torch.zeros(3)) for _ in range(500)])
    assert random_actions.min() >= -1.0 and random_actions.max() <= 1.0
    assert random_actions.mean(0).abs().max() < 0.1 and random_actions.std(0).min() > 0.5  # ≈ U(-1, 1)
    policy.uniform.fill_(False)  # the data module clears the flag after learning_starts env steps
    torch.manual_seed(0)
    expected = actor.act(torch.zeros(3))
    torch.manual_seed(0)
    assert torch.equal(policy(torch.zeros(3)), expected)
    assert "uniform" in dict(policy.named_buffers())  # travels to env workers with the weights


def collected(seed: int) -> torch.Tensor:
    torch.manual_seed(0)  # the actor's init and its sampling noise use the global RNG
    data = make_data(total_env_steps=120, seed=seed)
    for token in data.train_dataloader():
        data.on_before_batch_transfer(token, 0)
    stored = data._buffer.rows()[:120]
    data.teardown("fit")
    return torch.cat([stored["observation"], stored["action"]], dim=-1)


def test_same_seed_collects_the_same_transitions():
    first, again, other = collected(0), collected(0), collected(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(("key", "value"), [("total_env_steps", 0), ("batch_size", 0), ("utd", 0),
                                            ("learning_starts", -1), ("frames_per_batch", 0)])
def test_invalid_data_arguments(key, value):
    with pytest.raises(ValueError, match=key):
        ReplayDataModule(**{"env_id": "Pendulum-v1", "total_env_steps": 10, "learning_starts": 0, key: value})


def test_memmap_storage_in_a_shared_scratch_dir_can_be_used_again(tmp_path):
    for _ in range(2):  # a second run (or a resume) in the same scratch_dir must not collide with the first
        data = make_data(storage="memmap", scratch_dir=str(tmp_path), total_env_steps=120)
        for token in data.train_dataloader():
            data.on_before_batch_transfer(token, 0)
        assert len(data._buffer) == 120
        data.teardown("fit")
        assert list(tmp_path.iterdir()) == []  # the run's scratch folder is removed at teardown
