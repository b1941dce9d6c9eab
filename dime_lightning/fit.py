"""Train DIME: ``python -m dime_lightning.fit --config conf/pendulum.yaml [--config more.yaml] [--a.b value]``.

The config has these groups (``--print_config`` shows them all, resolved):
``model`` (DIMEModule: actor, critic, temperature, schedule, optimisers), ``data`` (ReplayDataModule: env id,
total_env_steps, learning_starts, buffer, batch size), ``trainer`` (lightning.Trainer), ``eval``,
``checkpoint``, ``monitor`` (callbacks, all in env steps), ``mlflow`` (tracking URI, experiment, run name)
and ``seed_everything``. Env dimensions are linked from the data module into the model, never written in YAML.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dime_lightning import checkpoint_schema as schema
from dime_lightning import host_memory
from dime_lightning.callbacks import EnvStepProgressBar, Evaluation, TrainingMonitor
from dime_lightning.checkpointing import (
    ConfigInCheckpoint,
    EnvStepCheckpoint,
    check_compatible,
    folder_checkpoints,
    open_for_resume,
    resolve_checkpoint,
)
from dime_lightning.compat import datamodule_checkpoint_key
from dime_lightning.configs import check_moved_keys, config_files, resolve_config_args
from dime_lightning.data import ReplayDataModule
from dime_lightning.distributed import resolve_strategy
from dime_lightning.errors import (
    EXIT_BAD_INPUT,
    EXIT_NO_SPACE,
    EXIT_NONFINITE,
    EXIT_SIGTERM,
    BadInputError,
    DiskSpaceError,
    NonFiniteError,
)
from dime_lightning.module import DIMEModule
from dime_lightning.runs import default_run_name, resolve_tracking_uri
from dime_lightning.safe_checkpoint import checkpoint_globals
from dime_lightning.tracking import (
    DIMEMLFlowLogger,
    MLflowRunInfo,
    check_tracking_uri,
    run_in_store,
    validate_tracking_uri,
)
from dime_lightning.tracking_queue import PENDING_GLOB, replay
from dime_lightning.video import choose_gl_backend

TRAINER_DEFAULTS = {
    "max_epochs": 1,  # one pass over the env-step iterable = data.total_env_steps
    "enable_checkpointing": False,  # checkpoints are written by the env-step `checkpoint` callback
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
    "log_every_n_steps": 50,
    "accelerator": "auto",
    "devices": 1,
}
SUPPORTED_PRECISION = ("32", "32-true", "bf16-mixed")


@dataclass
class MLflowSettings:
    """MLflow tracking. ``tracking_uri``: None → $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working
    directory (embedded, no server). ``experiment_name``: None → the env id. Writes are queued (training never
    waits for the store): ``max_pending`` records wait in memory, more go to ``mlflow-pending-*.jsonl`` beside the
    checkpoints, as does whatever is undelivered ``flush_timeout`` seconds after training ends.

    Args:
        enabled: track the run in MLflow. Default true.
        tracking_uri: MLflow tracking URI (``sqlite:///path.db``, ``http(s)://…``, ``databricks``); null:
            $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
        experiment_name: MLflow experiment; null: the env id.
        run_name: MLflow run name; null: ``<env id>-<actor>-seed<seed>`` (e.g. ``Pendulum-v1-DIME-seed0``).
        max_pending: MLflow records queued in memory before they spill to a file, >= 1. Default 10000.
        flush_timeout: seconds to wait for the tracking store after training before spilling what is left
            to ``mlflow-pending-*.jsonl``, >= 0. Default 60.
    """

    enabled: bool = True
    tracking_uri: str | None = None
    experiment_name: str | None = None
    run_name: str | None = None
    max_pending: int = 10_000
    flush_timeout: float = 60.0

    def resolved_uri(self) -> str:
        return resolve_tracking_uri(self.tracking_uri)


class DIMECLI(LightningCLI):
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does; on a parse error, also name the config file that causes it (or the value
        that is not a finite float)."""
        argv = list(args) if isinstance(args, list | tuple) else sys.argv[1:]
        check_moved_keys(argv)  # an old key is named with its new one, not as an unknown key
        for path in config_files(argv):  # before jsonargparse reads them: its decode error names no file
            try:
                Path(path).read_bytes().decode("utf-8")
            except UnicodeDecodeError as err:
                raise BadInputError(f"config file {path} is not UTF-8 text (a binary file?): {err}") from None
            except OSError:
                pass  # a missing file: jsonargparse's own message names it
        try:
            super().parse_arguments(parser, args)
        except SystemExit as exit_:
            culprit = self._failing_config_file(parser, argv) if exit_.code else None
            if culprit is not None:
                sys.stderr.write(f"dime_lightning.fit: error: the problem above is in the config file {culprit}\n")
            values = [arg.split("=", 1)[-1] if arg.startswith("--") else arg for arg in argv]
            nonfinite = [value for value in values if value.strip().lower().lstrip("+-.") in ("nan", "inf", "infinity")]
            if exit_.code and nonfinite:
                sys.stderr.write(f"dime_lightning.fit: error: {nonfinite[0]} is not a finite float: every float "
                                 "setting must be a finite float\n")
            raise

    @staticmethod
    def _failing_config_file(parser: LightningArgumentParser, argv: list[str]) -> str | None:
        """The first --config file that fails to parse on its own (over the defaults), if any."""
        parser.exit_on_error = False
        try:
            for path in config_files(argv):
                try:
                    parser.parse_args(["--config", path])
                except Exception:  # any parse failure points at this file
                    return path
        finally:
            parser.exit_on_error = True
        return None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.obs_dim", "model.obs_dim", apply_on="instantiate")
        parser.link_arguments("data.action_dim", "model.action_dim", apply_on="instantiate")
        parser.link_arguments("model.update.utd", "data.utd")
        parser.link_arguments("seed_everything", "data.seed")
        parser.add_lightning_class_args(Evaluation, "eval")
        parser.add_lightning_class_args(TrainingMonitor, "monitor")
        parser.add_lightning_class_args(EnvStepCheckpoint, "checkpoint")
        parser.add_class_arguments(MLflowSettings, "mlflow")
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None,
            help="resume: 'last' (newest last.ckpt), a checkpoint file, or an MLflow run id",
        )
        parser.add_argument(
            "--host_memory", type=host_memory.HostMemory, default="keep",
            help="freed host memory: 'keep' it for the next update (glibc; faster on a CPU, see "
                 "dime_lightning.host_memory) or leave the C allocator's 'system' defaults",
        )

    def before_instantiate_classes(self) -> None:
        if self.config.get("eval").video:  # MUJOCO_GL before an env's build imports dm_control
            choose_gl_backend()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        settings: MLflowSettings = self.config_init.get("mlflow")
        data: ReplayDataModule = self.datamodule
        self.config_init.get("eval").check_video(data.hparams.env_id)  # renderer and codec, or exit 2
        checkpointer: EnvStepCheckpoint = self.config_init.get("checkpoint")
        callbacks = []  # DIME's own; Lightning adds trainer.callbacks and the eval, monitor and checkpoint groups
        config = {**self.config_init.get("trainer", {}), **kwargs}
        uri = settings.resolved_uri()
        if settings.enabled:
            validate_tracking_uri(uri)
        if settings.max_pending < 1 or settings.flush_timeout < 0:
            raise BadInputError(f"mlflow.max_pending must be >= 1 and mlflow.flush_timeout >= 0, got "
                             f"{settings.max_pending}, {settings.flush_timeout}")
        precision = str(config.get("precision") or "32-true")
        if precision not in SUPPORTED_PRECISION:
            raise BadInputError(f"trainer.precision {precision!r} is not supported: use 32-true or bf16-mixed "
                             "(16-mixed's gradient scaler misbehaves with several optimizers stepped by hand; "
                             "the *-true modes would run the diffusion chain and the entropy bound in low precision)")
        run_id, self.resume_path, saved_ranks, source = None, None, 0, None
        ckpt_path = self.config.get("ckpt_path")
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))
        resolved["mlflow"]["tracking_uri"] = uri
        if ckpt_path:
            dirpath = str(checkpointer.dirpath) if checkpointer.dirpath else None
            found = resolve_checkpoint(ckpt_path, dirpath, uri, matches=lambda saved: _same_run_config(saved, resolved))
            key = datamodule_checkpoint_key(data)
            self.resume_path, checkpoint, data.verified_dump = open_for_resume(found, key)  # verified, or older
            check_compatible(checkpoint, self.resume_path, data.obs_dim, data.action_dim)
            run_id = schema.mlflow_run_id(checkpoint)
            source = {"run_id": run_id, "env_step": schema.env_steps(checkpoint),
                      "tracking_uri": schema.config(checkpoint).get("mlflow", {}).get("tracking_uri")}
            saved_ranks = len(schema.data_state(checkpoint, key).get("ranks", []))
            checkpointer.dirpath = checkpointer.dirpath or found.dirpath  # keep writing beside it
            del checkpoint
        elif checkpointer.dirpath is not None and folder_checkpoints(Path(checkpointer.dirpath)):
            raise BadInputError(f"checkpoint.dirpath {checkpointer.dirpath} already holds the checkpoints of a run: "
                             "resume it with --ckpt_path last, or give this run an empty folder (runs are never mixed)")
        callbacks.append(ConfigInCheckpoint(resolved))
        run_info = MLflowRunInfo(resolved, yaml.safe_dump(resolved, sort_keys=False), resumed=bool(run_id))
        if settings.enabled:
            callbacks.append(run_info)
        config["strategy"] = resolve_strategy(config.get("strategy"))
        config["logger"] = False  # attached after the checks below: the Trainer must not open the store before
        if config.get("enable_progress_bar", True) is not False:
            callbacks.append(EnvStepProgressBar(refresh_rate=10))
        user_callbacks = config.get("callbacks") or []
        config["callbacks"] = [*(user_callbacks if isinstance(user_callbacks, list) else [user_callbacks]), *callbacks]
        trainer = super().instantiate_trainer(**config)
        if trainer.world_size > 1:  # e.g. devices: 2 with strategy auto also makes a DDPStrategy: configure it too
            resolve_strategy(trainer.strategy)
        if saved_ranks and saved_ranks != trainer.world_size:  # each rank resumes its own buffer and RNG state
            raise BadInputError(
                f"the checkpoint {self.resume_path} was written by {saved_ranks} process{'es' * (saved_ranks > 1)} "
                f"(trainer.devices × trainer.num_nodes) but this run has {trainer.world_size}: resume with the same"
            )
        data.check_capacity(trainer.strategy.root_device, ranks_here=max(1, trainer.world_size // trainer.num_nodes))
        if settings.enabled and rank_zero_only.rank == 0:  # other ranks' processes (DDP, torchrun) leave the store
            check_tracking_uri(uri)  # last of the checks: opening the store creates an sqlite file
        if trainer.global_rank == 0 and checkpointer.dirpath is not None:
            checkpointer.hold_folder()  # one writer per run: before the run's folder or MLflow run is written
        if settings.enabled:
            if rank_zero_only.rank == 0:
                if run_id and not run_in_store(uri, run_id):  # the run was moved to another store: a new run
                    elsewhere = source["tracking_uri"] if source["tracking_uri"] != uri else f"{uri} of another folder"
                    rank_zero_warn(f"MLflow run {run_id} of the checkpoint {self.resume_path} is not in the store "
                                   f"{uri} (it was tracked in {elsewhere}): continuing in a new run tagged "
                                   "dime.source_run_id, dime.source_env_step and dime.source_tracking_uri. To continue "
                                   "the original run instead, stop this one and pass --mlflow.tracking_uri with the "
                                   "original store's URI")
                    run_id, run_info.resumed, run_info.source = None, False, source
                if run_id and checkpointer.dirpath is not None and any(Path(checkpointer.dirpath).glob(PENDING_GLOB)):
                    replay(Path(checkpointer.dirpath))  # what an earlier process could not deliver goes first
            trainer.logger = DIMEMLFlowLogger(
                experiment_name=settings.experiment_name or data.hparams.env_id,
                run_name=settings.run_name or default_run_name(resolved),
                tracking_uri=uri,
                run_id=run_id,
                spill_dir=lambda: checkpointer.dirpath,
                max_pending=settings.max_pending,
                flush_timeout=settings.flush_timeout,
            )
        return trainer


def _same_run_config(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a checkpoint's stored config comes from a run of this config (env id, seed, actor class)."""
    def key(config: dict[str, Any]) -> tuple:
        return (config.get("data", {}).get("env_id"), config.get("seed_everything"),
                config.get("model", {}).get("actor", {}).get("class_path"))

    return key(saved) == key(current)


def build_cli(args: list[str] | None = None) -> DIMECLI:
    """Parse, validate and instantiate everything (no training). Bad input raises SystemExit with a message."""
    args = resolve_config_args(sys.argv[1:] if args is None else list(args))  # conf/<name>: packaged if not here
    try:
        return DIMECLI(
            DIMEModule,
            ReplayDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            save_config_callback=None,  # replaced by MLflowRunInfo (the stock one breaks on non-file URIs)
            auto_configure_optimizers=False,  # the module builds its own three optimizers (docs/algorithm.md §5)
            parser_kwargs={"description": __doc__},
            args=args,
            run=False,
        )
    except BadInputError as err:  # constructors, env ids, extras, checkpoints, tracking URI (never a bug's error)
        sys.stderr.write(f"dime_lightning.fit: error: {err}\n")
        raise SystemExit(EXIT_BAD_INPUT) from err


def main(args: list[str] | None = None) -> None:
    cli = build_cli(args)
    host_memory.apply(cli.config["host_memory"])
    checkpointer = next((c for c in cli.trainer.callbacks if isinstance(c, EnvStepCheckpoint)), None)
    try:
        with checkpoint_globals():  # Lightning's own load of the (already checked) checkpoint: weights only
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resume_path, weights_only=True)
    except DiskSpaceError as err:
        sys.stderr.write(f"dime_lightning.fit: error: {err} (the MLflow run is FAILED)\n")
        raise SystemExit(EXIT_NO_SPACE) from err
    except SIGTERMException as err:
        sys.stderr.write("dime_lightning.fit: stopped by SIGTERM (checkpoint written, MLflow run KILLED)\n")
        raise SystemExit(EXIT_SIGTERM) from err
    except NonFiniteError as err:
        sys.stderr.write(f"dime_lightning.fit: error: {err} (the last good checkpoint is kept; the MLflow run "
                         "is FAILED)\n")
        raise SystemExit(EXIT_NONFINITE) from err
    finally:
        if checkpointer is not None:  # the run's writer lock: held until everything, the store included, is done
            checkpointer.release_folder()


if __name__ == "__main__":
    main()
