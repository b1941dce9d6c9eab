"""Scaling switches through the real CLI on CPU: 2-process DDP (gloo), bf16-mixed, multi-process collection."""

from __future__ import annotations

import copy
from pathlib import Path

import mlflow
import pytest
import torch
from fit_runs import run_fit
from tensordict import TensorDict
from tiny_networks import make_actor, make_batch, make_critic

from dime_lightning.collection import CollectionPolicy, build_collector
from dime_lightning.gaussian import TanhGaussianActor
from dime_lightning.losses import actor_loss, critic_loss
from dime_lightning.module import maybe_compile
from dime_lightning.optim import adam
from dime_lightning.replay import ReplayRing

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SMOKE = ["--config", str(CONF / "pendulum.yaml"), "--config", str(CONF / "smoke.yaml")]


def load_buffer(path: Path) -> TensorDict:
    return ReplayRing.from_dump(path).rows()


def test_ddp_two_processes_gloo_through_the_cli(tmp_path):
    # the README's multi-device command, on CPU: Lightning launches rank 1 by re-running this command line
    result = run_fit(tmp_path, *SMOKE, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                     "--trainer.callbacks+=ddp_probe.SaveRankState")
    assert result.returncode == 0, result.stderr[-4000:]
    # the two ranks collected different transitions, half of the env steps each
    dump = tmp_path / "ckpt" / "step-0000000300.buffer"
    shards = [load_buffer(dump / f"rank{rank}") for rank in (0, 1)]
    assert [len(shard) for shard in shards] == [150, 150]
    obs = [shard["observation"] for shard in shards]
    assert not torch.allclose(obs[0][:10], obs[1][:10])
    # parameters and batch-renorm statistics are identical on both ranks at the end
    states = [torch.load(tmp_path / f"rank{rank}-state.pt", weights_only=False) for rank in (0, 1)]
    assert states[0]["world_size"] == 2 and states[0]["env_steps"] == states[1]["env_steps"] == 300
    assert states[0]["state"].keys() == states[1]["state"].keys()
    for key, value in states[0]["state"].items():
        assert torch.equal(value, states[1]["state"][key]), key
    assert any("running_mean" in key for key in states[0]["state"])
    # one MLflow run (rank 0), x-axis in env steps counted over both ranks, eval on rank 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["Pendulum-v1"])
    assert len(runs) == 1 and runs.status[0] == "FINISHED"
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(runs.run_id[0], "eval/return_mean")] == [150, 300]
    # counters: 150 env steps per rank, learning after 50 per rank; each update is one all-reduced step
    checkpoint = torch.load(tmp_path / "ckpt" / "final.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["dime_counters"] == {"env_steps": 300, "critic_updates": 200, "actor_updates": 66,
                                           "skipped_updates": 0}
    ranks = checkpoint["ReplayDataModule"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch_rng"], ranks[1]["torch_rng"])


def test_ddp_ranks_started_together_by_torchrun(tmp_path):
    # torchrun (like srun) starts every rank at once, each running the whole CLI: the ranks must neither create
    # the sqlite store side by side (MLflow's client opens it on every rank) nor disagree on the run
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m")
    result = run_fit(tmp_path, *SMOKE, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                     "--trainer.callbacks+=ddp_probe.SaveRankState", launcher=torchrun)
    assert result.returncode == 0, result.stderr[-4000:]
    states = [torch.load(tmp_path / f"rank{rank}-state.pt", weights_only=False) for rank in (0, 1)]
    assert states[0]["world_size"] == 2 and states[0]["env_steps"] == states[1]["env_steps"] == 300
    for key, value in states[0]["state"].items():
        assert torch.equal(value, states[1]["state"][key]), key
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("Pendulum-v1")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.status for run in runs] == ["FINISHED"]


def test_ddp_resume_needs_the_same_number_of_processes(tmp_path):
    first = run_fit(tmp_path, *SMOKE, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                    "--data.total_env_steps", "150")
    assert first.returncode == 0, first.stderr[-4000:]
    wrong = run_fit(tmp_path, *SMOKE, "--ckpt_path", "last")
    assert wrong.returncode == 2
    assert "written by 2 processes" in wrong.stderr and "this run has 1" in wrong.stderr
    resumed = run_fit(tmp_path, *SMOKE, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                      "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    checkpoint = torch.load(tmp_path / "ckpt" / "final.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["dime_counters"]["env_steps"] == 300
    assert checkpoint["dime_counters"]["critic_updates"] == 200  # the buffers came back: no refill


@pytest.mark.parametrize("precision", ["bf16-mixed"])
def test_bf16_mixed_smoke_fit(tmp_path, precision):
    result = run_fit(tmp_path, *SMOKE, "--trainer.precision", precision)
    assert result.returncode == 0, result.stderr[-4000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = mlflow.search_runs(experiment_names=["Pendulum-v1"]).run_id[0]
    client = mlflow.MlflowClient()
    for key in ("train/loss_critic", "train/loss_actor", "train/loss_alpha"):
        values = [m.value for m in client.get_metric_history(run_id, key)]
        assert values and all(torch.isfinite(torch.tensor(values))), key


@pytest.mark.parametrize("actor_kind", ["diffusion", "gaussian"])
def test_bf16_autocast_keeps_float32_where_required(actor_kind):
    torch.manual_seed(0)
    actor = make_actor() if actor_kind == "diffusion" else TanhGaussianActor(3, 2, hidden_dim=16)
    critic, batch, alpha = make_critic(), make_batch(), torch.tensor(0.1)
    reference_critic = copy.deepcopy(critic)  # the train-mode pass moves batch-renorm statistics
    torch.manual_seed(1)
    reference_loss = critic_loss(reference_critic, actor, batch, alpha, 0.99)["loss_critic"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)  # the same next-action noise
        critic_metrics = critic_loss(critic, actor, batch, alpha, 0.99)
        actor_metrics = actor_loss(actor, critic, batch["observation"], alpha)
        out = actor(batch["observation"], return_trajectory=True)
        assert critic(batch["observation"], batch["action"]).dtype == torch.bfloat16  # autocast is active
    # the sampler chain and the entropy bound accumulate in float32; so do the critic's log-softmax,
    # cross-entropy and projection, and every loss
    for tensor in (out.action, out.log_prob, out.running_cost, out.terminal_cost, out.trajectory):
        assert tensor.dtype == torch.float32
    for metrics in (critic_metrics, actor_metrics):
        assert all(value.dtype == torch.float32 for value in metrics.values())
    assert critic_metrics["target_q_mean"].dtype == torch.float32
    # and the bf16 losses stay close to the float32 ones
    assert torch.allclose(critic_metrics["loss_critic"], reference_loss, rtol=0.02)
    assert torch.isfinite(actor_metrics["loss_actor"])


def test_multiprocess_collection_through_the_cli(tmp_path):
    result = run_fit(tmp_path, *SMOKE, "--data.env_id", "pid_env:PidPendulum-v0", "--data.num_workers", "2",
                     "--data.frames_per_batch", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    buffer = load_buffer(tmp_path / "ckpt" / "step-0000000300.buffer" / "rank0")
    process_ids = buffer["observation"][:, -1]  # the env's process id (tests/pid_env.py)
    ids, counts = process_ids.unique(return_counts=True)
    assert len(ids) == 2 and counts.tolist() == [150, 150]  # two env worker processes, half of the steps each


class ConstantActor(torch.nn.Module):
    """Acts with tanh(bias) everywhere: shows which weights a worker holds."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def act(self, observation: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.bias).expand(*observation.shape[:-1], 1)


def test_worker_policies_receive_weights_and_the_warmup_flag():
    policy = CollectionPolicy(ConstantActor(), action_dim=1, seed=0)
    collector = build_collector("Pendulum-v1", policy, frames_per_batch=4, num_workers=2, seed=0)
    try:
        warmup = collector.next()["action"].reshape(-1)  # (2, 2) -> (4,)
        assert len(warmup.unique()) == 4  # uniform random, different in each worker
        with torch.no_grad():
            policy.actor.bias.fill_(0.5)
        policy.uniform.fill_(False)
        collector.update_policy_weights_()
        collector.next()  # a batch may already be under way with the old weights
        acted = collector.next()["action"].reshape(-1)
        assert torch.allclose(acted, torch.tanh(torch.tensor(0.5)).expand(4))
    finally:
        collector.shutdown()


def one_update(critic_fn, actor_fn, actor, critic, batch, alpha):
    """Critic step then actor step (Adam), twice, as in training_step: [loss_critic, loss_actor] per update, and
    the gradients of the first update."""
    critic_opt, actor_opt = adam(critic.parameters(), 1e-3), adam(actor.parameters(), 1e-3)
    losses = []
    for _ in range(2):
        torch.manual_seed(1)
        critic_value = critic_fn(critic, actor, batch, alpha, 0.99)["loss_critic"]
        critic_opt.zero_grad()
        critic_value.backward()
        critic_opt.step()
        actor_value = actor_fn(actor, critic, batch["observation"], alpha)["loss_actor"]
        actor_opt.zero_grad()
        actor_value.backward()
        actor_opt.step()
        losses.append(torch.stack([critic_value.detach(), actor_value.detach()]))
        if len(losses) == 1:
            grads = {name: p.grad.clone() for name, p in [*actor.named_parameters(), *critic.named_parameters()]
                     if p.grad is not None}
    return torch.stack(losses), grads


@pytest.fixture
def eager_random_in_graphs():
    """Compiled graphs draw from the eager RNG stream (inductor's fallback_random), set through the config's own
    patch(): pytest's monkeypatch cannot restore torch's config modules (the option vanishes after undo)."""
    with torch._inductor.config.patch(fallback_random=True):
        yield


def test_compiled_update_matches_eager(eager_random_in_graphs):
    torch._dynamo.reset()
    torch.manual_seed(0)
    actor, critic, batch, alpha = make_actor(), make_critic(), make_batch(), torch.tensor(0.1)
    compiled_actor, compiled_critic = copy.deepcopy(actor), copy.deepcopy(critic)
    eager, eager_grads = one_update(critic_loss, actor_loss, actor, critic, batch, alpha)
    compiled, compiled_grads = one_update(maybe_compile(critic_loss, "default"), maybe_compile(actor_loss, "default"),
                                          compiled_actor, compiled_critic, batch, alpha)
    assert torch.allclose(compiled[0], eager[0], rtol=1e-5), (compiled, eager)  # the same losses ...
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 10
    for name, grad in eager_grads.items():  # ... and gradients
        assert torch.allclose(compiled_grads[name], grad, rtol=1e-4, atol=1e-7), name
    # after the first Adam step: Adam normalises the near-zero gradients of the actor's 1e-8-initialised output
    # layer, so float rounding differences of ~1e-7 become parameter differences of up to ±lr there
    assert torch.allclose(compiled[1], eager[1], rtol=2e-3), (compiled, eager)
    assert not torch.equal(eager[0], eager[1])  # the update moved the losses


def test_ddp_nonfinite_env_data_on_one_rank_stops_both(tmp_path):
    result = run_fit(tmp_path, *SMOKE, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                     "--data.env_id", "nan_env:NaNRewardOnRank1Pendulum-v0", timeout=300)
    assert result.returncode == 3, result.stderr[-4000:]  # no hang: rank 0 learns of rank 1's NaN and stops too
    assert "non-finite next/reward" in result.stderr and "on rank 1" in result.stderr
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and runs.status[0] == "FAILED"
