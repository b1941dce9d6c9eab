"""DIMEMLFlowLogger through MLFlowLogger's public API: every write queued, nothing opened when nothing was logged,
a resumed run continues without duplicate steps; MLflowRunInfo's tags of the speed modes as run."""

from __future__ import annotations

from types import SimpleNamespace

import mlflow

from dime_lightning.tracking import DIMEMLFlowLogger, MLflowRunInfo
from dime_lightning.tracking_queue import QueuedClient


def make(tmp_path, **kwargs) -> DIMEMLFlowLogger:
    return DIMEMLFlowLogger(experiment_name="compat", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                            spill_dir=lambda: tmp_path, flush_timeout=30.0, **kwargs)


def test_writes_go_through_the_queue_and_a_run_never_opened_is_not_created(tmp_path) -> None:
    unused = make(tmp_path)
    unused.finalize("success")  # nothing was logged: no run to open or to finish
    logger = make(tmp_path)
    assert isinstance(logger.experiment, QueuedClient)  # Lightning's log_metrics / log_hyperparams write here
    logger.log_hyperparams({"a": 1})
    logger.log_metrics({"loss": 0.5}, step=3)
    logger.finalize("success")
    assert logger.pending_file is None  # all delivered
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("compat").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params == {"a": "1"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(3, 0.5)]


def test_an_experiment_created_by_another_process_meanwhile_is_used(tmp_path, monkeypatch) -> None:
    """Two jobs started together: the other creates the experiment between this logger's lookup and its create."""
    mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("compat")
    lookup = mlflow.MlflowClient.get_experiment_by_name
    missed = []

    def stale_once(self, name):
        if not missed:
            missed.append(name)
            return None  # as seen just before the other process created it
        return lookup(self, name)

    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name", stale_once)
    logger = make(tmp_path)
    logger.log_metrics({"loss": 1.0}, step=1)
    logger.finalize("success")
    assert missed == ["compat"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([lookup(client, "compat").experiment_id])
    assert run.info.status == "FINISHED"


def test_a_resumed_run_drops_the_steps_it_already_has(tmp_path) -> None:
    first = make(tmp_path)
    for step in (1, 2, 3):
        first.log_metrics({"loss": float(step)}, step=step)
    first.finalize("failed")
    resumed = make(tmp_path, run_id=first.run_id)
    for step in (2, 3, 4):  # replayed after the checkpoint at step 1: 2 and 3 are in the run already
        resumed.log_metrics({"loss": 10.0 * step}, step=step)
    resumed.finalize("success")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")]
    assert sorted(history) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_the_speed_modes_are_tagged_as_run_and_again_when_one_changes(tmp_path) -> None:
    """MLflowRunInfo tags what "auto" resolved to at the start, and re-tags once after the first update if the
    update's mode changed (the CUDA self-check's fall-back to eager: update.py)."""
    logger = make(tmp_path)
    trainer = SimpleNamespace(logger=logger, datamodule=SimpleNamespace(storage="device"))
    module = SimpleNamespace(modes={"compile": "whole", "compile_act": "reduce-overhead"}, env_steps=0,
                             critic_updates=0)
    config = {"model": {"update": {"compile": "auto"}}, "data": {"env_id": "Pendulum-v1"}}
    info = MLflowRunInfo(config, "", resumed=True)
    info.on_fit_start(trainer, module)
    info.on_train_batch_end(trainer, module, None, None, 0)  # random warm-up: not checked yet
    module.modes = {"compile": "none", "compile_act": "reduce-overhead"}  # the self-check fell back
    module.critic_updates = 2
    info.on_train_batch_end(trainer, module, None, None, 1)
    logger.finalize("success")
    tags = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(logger.run_id).data.tags
    assert (tags["dime.compile"], tags["dime.compile_act"], tags["dime.storage"]) == ("none", "reduce-overhead",
                                                                                      "device")
