"""The replay ring (replay.py) and the in-process collector (collection.py): what they store, sample, dump and
load, against TorchRL's buffer and env that they replace on the hot path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

from dime_lightning.collection import CollectionPolicy, InProcessCollector
from dime_lightning.envs import make_env
from dime_lightning.errors import BadInputError, DamagedDumpError
from dime_lightning.replay import ReplayRing, transition_layout

LAYOUT = transition_layout(3, 1)


def transition(i: int) -> dict:
    return {"observation": np.full(3, i, np.float32), "action": torch.full((1,), i / 100),
            ("next", "observation"): np.full(3, i + 1, np.float32), ("next", "reward"): float(i),
            ("next", "terminated"): i % 7 == 0}


def filled(n: int, capacity: int = 10, **kwargs) -> ReplayRing:
    ring = ReplayRing(capacity, LAYOUT, **kwargs)
    for i in range(n):
        ring.add(transition(i))
    return ring


def test_the_ring_overwrites_the_oldest_and_samples_like_torchrl():
    ring = filled(13)
    assert len(ring) == 10 and ring.written == 13
    rows = ring.rows()
    assert rows["observation"][:, 0].tolist() == [10, 11, 12, 3, 4, 5, 6, 7, 8, 9]  # 10..12 replaced 0..2
    assert rows["next", "terminated"].squeeze(-1).tolist() == [False, False, False, False, False, False, False,
                                                               True, False, False]
    torchrl = TensorDictReplayBuffer(storage=LazyTensorStorage(10), batch_size=64)
    torchrl.extend(rows.clone())
    torch.manual_seed(3)
    ours = ring.sample(64)
    torch.manual_seed(3)
    theirs = torchrl.sample()
    assert ours.batch_size == torch.Size([64])
    assert torch.equal(ours["observation"], theirs["observation"])  # the same indices from the same seed
    assert torch.equal(ours["next", "reward"], theirs["next", "reward"])


@pytest.mark.parametrize("kind", ["memory", "memmap"])
def test_a_dump_loads_back_exactly_also_after_wrapping(tmp_path, kind):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ring = filled(13, kind=kind, scratch=scratch if kind == "memmap" else None)
    (tmp_path / "dump").mkdir()
    ring.dump(tmp_path / "dump")
    for path in (tmp_path / "dump").glob("*.npy"):
        np.load(path, allow_pickle=False)  # plain arrays, no pickle
    again = ReplayRing(10, LAYOUT)
    again.load(tmp_path / "dump")
    assert again.written == 13 and (again.rows() == ring.rows()).all()
    again.add(transition(13))  # the cursor continues where the dumped ring was
    assert again.rows()["observation"][3, 0] == 13
    assert (ReplayRing.from_dump(tmp_path / "dump").rows() == ring.rows()).all()


def test_load_refuses_another_env_a_smaller_ring_and_damaged_files(tmp_path):
    filled(13).dump(tmp_path)
    with pytest.raises(BadInputError, match="another env"):
        ReplayRing(10, transition_layout(4, 1)).load(tmp_path)
    with pytest.raises(BadInputError, match=r"data\.buffer_size"):
        ReplayRing(20, LAYOUT).load(tmp_path)  # a wrapped ring cannot be unrolled into another capacity
    np.save(tmp_path / "action.npy", np.zeros((10, 2), np.float32))
    with pytest.raises(DamagedDumpError, match=r"action\.npy holds float32 \(10, 2\), expected torch\.float32 \(10, 1"):
        ReplayRing(10, LAYOUT).load(tmp_path)
    (tmp_path / "ring.json").write_text(json.dumps({"format": 99, "capacity": 10, "written": 3, "keys": {}}))
    with pytest.raises(DamagedDumpError, match="not a format-1 ring"):
        ReplayRing(10, LAYOUT).load(tmp_path)
    (tmp_path / "ring.json").write_text("{")
    with pytest.raises(DamagedDumpError, match=r"ring\.json cannot be read"):
        ReplayRing(10, LAYOUT).load(tmp_path)


def test_a_dump_of_torchrls_buffer_from_earlier_versions_loads(tmp_path):
    rows = filled(6).rows().clone()
    legacy = TensorDictReplayBuffer(storage=LazyTensorStorage(10))
    for row in rows.unbind(0):
        legacy.add(row)
    legacy.dumps(tmp_path)
    ring = ReplayRing(10, LAYOUT)
    ring.load(tmp_path)
    assert ring.written == 6 and (ring.rows() == rows).all()


class Tanh(torch.nn.Module):
    """A deterministic actor: the same action from the same observation, in both collectors."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(3.0))

    def act(self, observation: torch.Tensor) -> torch.Tensor:
        return torch.tanh(observation[..., :1] * self.scale).detach()


def test_the_in_process_collector_steps_like_the_torchrl_env():
    policy = CollectionPolicy(Tanh(), action_dim=1, seed=0)
    policy.uniform.fill_(False)
    ours = InProcessCollector("Pendulum-v1", policy, seed=5)
    env = make_env("Pendulum-v1")
    state = env.reset(seed=5)
    for step_index in range(1, 402):  # two truncated episodes (Pendulum: 200 steps) and one more step
        (step,) = ours.steps()
        state["action"] = Tanh().act(state["observation"])
        result, state = env.step_and_maybe_reset(state)
        for key in ("observation", "action", ("next", "observation"), ("next", "reward"), ("next", "terminated")):
            assert torch.allclose(torch.as_tensor(step.transition[key]).reshape(-1).float(),
                                  result[key].reshape(-1).float(), atol=1e-5), (step_index, key)
        assert step.nonfinite is None
        if step_index % 200 == 0:
            assert step.episode[1] == 200 and step.episode[0] == pytest.approx(float(result["next", "episode_reward"]),
                                                                               rel=1e-5)
        else:
            assert step.episode is None
    ours.shutdown()
    env.close()


def test_a_non_finite_step_is_named():
    policy = CollectionPolicy(Tanh(), action_dim=1, seed=0)
    collector = InProcessCollector("nan_env:NaNRewardPendulum-v0", policy, seed=0)  # NaN rewards after 150 steps
    names = [collector.steps()[0].nonfinite for _ in range(151)]
    collector.shutdown()
    assert names == [None] * 150 + ["next/reward"]


def test_sampled_minibatches_are_a_tensordict_on_the_ring_device():
    sample = filled(5).sample(8)
    assert isinstance(sample, TensorDict) and sample.device == torch.device("cpu")
    assert sample["next", "terminated"].dtype == torch.bool and sample["action"].shape == (8, 1)


def test_the_tensor_write_path_of_a_device_ring_stores_the_same_rows():
    """A ring on a GPU writes through ``copy_`` (no numpy view): the same path, forced on the CPU here."""
    through_numpy = filled(13)
    through_torch = ReplayRing(10, LAYOUT)
    through_torch._arrays = {}  # as on a GPU
    for i in range(13):
        through_torch.add(transition(i))
    assert (through_torch.rows() == through_numpy.rows()).all()
