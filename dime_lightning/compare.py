"""Compare MLflow runs: learning curves grouped by a param, the published reference beside them, and a table
with the interquartile mean (IQM) and its stratified-bootstrap 95 % confidence interval.

    python -m dime_lightning.compare --experiment Pendulum-v1 [--metric eval/return_mean]
        [--group_by params.model.actor.class_path] [--tracking_uri sqlite:///mlflow.db] [--out curves.png]
    python -m dime_lightning.compare --experiment dm_control/pendulum-swingup --reference paper

Each group (e.g. DIME vs Gaussian) of each task (``params.data.env_id``; the experiment name when it is not
logged) is one curve: the mean over its runs at each env step with a band from the minimum to the maximum
across runs, and beside it the IQM over runs with its 95 % CI (rliable). ``--reference paper`` draws the
published DIME runs of the same task (mean and min–max of 10 seeds, up to one published interval past your
last point) and adds them to the table, at the published step nearest to your last step and at their own last
step; a version mismatch (Gym v3 in the paper, Gymnasium v5 here) is written on the plot and in the table.
With several DMC tasks in one experiment the table ends with the IQM over runs × tasks of normalised scores
(return / 1000). The table lists per group: runs, the env step of the final value, the final value (mean ± std
across runs), IQM and CI, and the mean wall time. Without ``--metric`` each task is read on the metric its
published curves measure (``reference.published_metric``): the success rate for the MyoSuite hand tasks, the
evaluation return everywhere else.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from dime_lightning import aggregates, reference
from dime_lightning.errors import CompareError
from dime_lightning.runs import DEFAULT_TRACKING_URI, actor_label, resolve_tracking_uri
from dime_lightning.small_cli import make_parser, parse

DEFAULT_GROUP = "params.model.actor.class_path"
TASK_COLUMN = "params.data.env_id"
REFERENCE_MARGIN = 24_000  # env steps of the published curve drawn past the last point of the runs
AGGREGATE = "all DMC tasks (return / 1000)"


@dataclass
class GroupCurve:
    """One group's curve on one task: mean and min–max band, and the IQM with its 95 % CI."""

    label: str
    steps: np.ndarray  # (T,)
    mean: np.ndarray  # (T,)
    low: np.ndarray  # (T,)
    high: np.ndarray  # (T,)
    runs: int
    task: str = ""
    values: np.ndarray | None = None  # (T, runs)
    iqm: np.ndarray | None = None  # (T,)
    iqm_low: np.ndarray | None = None  # (T,)
    iqm_high: np.ndarray | None = None  # (T,)
    note: str = ""
    reference_task: str = ""  # the published task, for reference curves
    source: str = ""  # the reference source, for reference curves


def find_runs(experiment: str, tracking_uri: str, group_by: str) -> pd.DataFrame:
    """Runs of ``experiment`` (FINISHED, RUNNING, KILLED, FAILED) with ``group`` and ``task`` columns.

    experiment: MLflow experiment name.
    tracking_uri: MLflow tracking URI, e.g. ``sqlite:///mlflow.db``.
    group_by: the run column whose values name the groups."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"unknown experiment {experiment!r}; experiments in {tracking_uri}: {names}")
    runs = _search(found.experiment_id, tracking_uri)
    if runs.empty:
        raise CompareError(f"experiment {experiment!r} has no runs")
    if group_by not in runs.columns:
        keys = sorted(c for c in runs.columns if c.startswith(("params.", "tags.")))
        raise CompareError(f"unknown --group_by {group_by!r}; available: {keys}")
    runs = runs.copy()
    runs["group"] = runs[group_by].fillna("(unset)").map(actor_label)
    tasks = runs[TASK_COLUMN] if TASK_COLUMN in runs.columns else pd.Series(np.nan, index=runs.index)
    runs["task"] = tasks.fillna(experiment)
    return runs


def _search(experiment_id: str, tracking_uri: str) -> pd.DataFrame:
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.search_runs([experiment_id])
    finally:
        mlflow.set_tracking_uri(previous)


def reference_matches(runs: pd.DataFrame, source: str) -> dict[str, reference.ReferenceTask]:
    """Task (env id) → its published reference task; ``CompareError`` naming a task that has none.

    runs: runs from ``find_runs``.
    source: a reference source, e.g. ``paper``."""
    try:
        return {task: reference.reference_task(task, source) for task in sorted(runs.task.unique())}
    except reference.ReferenceDataError as err:
        raise CompareError(str(err)) from err


def task_metrics(runs: pd.DataFrame, metric: str | None) -> dict[str, str]:
    """task → the metric its runs are read on: ``metric`` for every task, or with None each task's published one.

    runs: runs from ``find_runs``.
    metric: an MLflow metric key, or None."""
    return {task: metric or reference.published_metric(task) for task in sorted(runs.task.unique())}


def metric_label(metrics: dict[str, str]) -> str:
    """The metric's name when every task uses the same one, else ``score`` (the table's column name).

    metrics: task → metric, from ``task_metrics``."""
    names = set(metrics.values())
    return names.pop() if len(names) == 1 else "score"


def metric_histories(runs: pd.DataFrame, metric: str | dict[str, str], tracking_uri: str) -> dict[str, pd.Series]:
    """run id → the metric's values indexed by env step.

    runs: runs from ``find_runs``.
    metric: MLflow metric key, e.g. ``eval/return_mean``, or task → key (``task_metrics``).
    tracking_uri: MLflow tracking URI."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    histories = {}
    for run_id, task in zip(runs.run_id, runs.task, strict=True):
        points = client.get_metric_history(run_id, metric if isinstance(metric, str) else metric[task])
        if points:
            histories[run_id] = pd.Series({m.step: m.value for m in points}).sort_index()
    if not histories:
        available = sorted({c[len("metrics."):] for c in runs.columns if c.startswith("metrics.")})
        names = [metric] if isinstance(metric, str) else sorted(set(metric.values()))
        wanted = names[0] if len(names) == 1 else names
        raise CompareError(f"unknown metric {wanted!r} in these runs; available: {available}")
    return histories


def _curve(label: str, task: str, steps: np.ndarray, values: np.ndarray, reps: int,
           match: reference.ReferenceTask | None = None) -> GroupCurve:
    iqm, iqm_low, iqm_high = aggregates.iqm_curve(values, reps=reps)
    return GroupCurve(label, steps, values.mean(1), values.min(1), values.max(1), values.shape[1], task, values,
                      iqm, iqm_low, iqm_high, match.note if match else "", match.task if match else "",
                      match.source if match else "")


def group_curves(runs: pd.DataFrame, histories: dict[str, pd.Series],
                 reps: int = aggregates.DEFAULT_REPS) -> list[GroupCurve]:
    """Per task and group: mean, min–max band and IQM with CI over the env steps that all its runs logged.

    runs: runs from ``find_runs``.
    histories: run id → metric values by env step, from ``metric_histories``.
    reps: bootstrap replications of the IQM confidence intervals."""
    curves = []
    for (task, label), members in runs.groupby(["task", "group"]):
        series = [histories[r] for r in members.run_id if r in histories]
        if not series:
            continue
        table = pd.concat(series, axis=1).sort_index().dropna()  # steps logged by every run of the group
        if table.empty:  # runs on different grids: fall back to the union, forward-filled
            table = pd.concat(series, axis=1).sort_index().ffill().dropna()
        curves.append(_curve(str(label), str(task), table.index.to_numpy(), table.to_numpy(), reps))
    return curves


def reference_curves(curves: list[GroupCurve], matches: dict[str, reference.ReferenceTask],
                     reps: int = aggregates.DEFAULT_REPS) -> list[GroupCurve]:
    """The published curve of each task, up to ``REFERENCE_MARGIN`` env steps past the task's last point.

    curves: the runs' curves from ``group_curves``.
    matches: task → reference task, from ``reference_matches``.
    reps: bootstrap replications of the IQM confidence intervals."""
    out = []
    for task, match in matches.items():
        last = max((c.steps[-1] for c in curves if c.task == task), default=0)
        steps, values = reference.reference_seeds(match.task, match.source)
        keep = steps <= last + REFERENCE_MARGIN
        out.append(_curve(f"{reference.SOURCE_LABELS[match.source]} ({match.task})", task, steps[keep],
                          values[keep], reps, match))
    return out


def _row(curve: GroupCurve, index: int, wall: float, reps: int) -> dict:
    finals = curve.values[index]
    interval = aggregates.iqm_ci(finals, reps=reps)
    return {"task": curve.task, "group": curve.label, "runs": curve.runs, "env steps": int(curve.steps[index]),
            "final": float(np.mean(finals)), "std": float(np.std(finals, ddof=1 if len(finals) > 1 else 0)),
            "IQM": interval.point,
            "IQM 95% CI low": interval.low, "IQM 95% CI high": interval.high, "wall minutes (mean)": wall,
            "note": curve.note}


def summary_table(runs: pd.DataFrame, histories: dict[str, pd.Series], metric: str,
                  curves: list[GroupCurve] | None = None, references: list[GroupCurve] | None = None,
                  reps: int = aggregates.DEFAULT_REPS) -> pd.DataFrame:
    """One row per task and group (and per reference point), plus the cross-task aggregate for several DMC tasks.

    runs: runs from ``find_runs``.
    histories: run id → metric values by env step.
    metric: the metric's name (the ``final`` column is named after it).
    curves: the runs' curves (computed from ``runs`` and ``histories`` when omitted).
    references: published curves from ``reference_curves``, or None.
    reps: bootstrap replications of the IQM confidence intervals."""
    curves = group_curves(runs, histories, reps) if curves is None else curves
    rows, finals = [], {}
    for curve in curves:
        members = runs[(runs.task == curve.task) & (runs.group == curve.label)]
        ended = pd.to_datetime(members.end_time, utc=True)  # NaT while a run is still RUNNING
        wall = float(((ended - pd.to_datetime(members.start_time, utc=True)).dt.total_seconds() / 60.0).mean())
        rows.append(_row(curve, -1, wall, reps))
        finals.setdefault(curve.label, {})[curve.task] = curve.values[-1]
    for ref in references or []:
        last = max(c.steps[-1] for c in curves if c.task == ref.task)
        nearest = int(np.argmin(np.abs(ref.steps - last)))
        rows.append(_row(ref, nearest, np.nan, reps))
        finals.setdefault(reference.SOURCE_LABELS[ref.source], {})[ref.task] = ref.values[nearest]
        steps, values = reference.reference_seeds(ref.reference_task)
        if int(ref.steps[nearest]) != int(steps[-1]):  # also the published run's own last point
            rows.append(_row(replace(ref, steps=steps, values=values), -1, np.nan, reps))
    dmc_tasks = sorted({c.task for c in curves if c.task.startswith(reference.DMC_PREFIX)})
    if len(dmc_tasks) > 1:
        for label, per_task in finals.items():
            scores = {t: aggregates.normalise_dmc(v) for t, v in per_task.items() if t in dmc_tasks}
            if len(scores) == len(dmc_tasks):
                interval = aggregates.aggregate_over_tasks(scores, reps=reps)
                note = "" if label in {c.label for c in curves} else "published points nearest to the runs' last"
                rows.append({"task": AGGREGATE, "group": label, "runs": interval.n, "IQM": interval.point,
                             "IQM 95% CI low": interval.low, "IQM 95% CI high": interval.high, "note": note})
    table = pd.DataFrame(rows).rename(columns={"final": f"final {metric}"})
    if table.task.nunique() == 1:
        return table.drop(columns="task").set_index("group")
    return table.set_index(["task", "group"])


def plot_curves(curves: list[GroupCurve], metric: str, title: str, ax=None, iqm: bool = False):
    """Draw curves on ``ax`` (a new figure when None): means with min–max bands, or IQMs with 95 % CIs.

    curves: curves of one task (runs and references).
    metric: y-axis label.
    title: axes title.
    ax: matplotlib axes, or None.
    iqm: draw the IQM and its CI instead of the mean and min–max band."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    for curve in curves:
        centre, low, high = (curve.iqm, curve.iqm_low, curve.iqm_high) if iqm else (curve.mean, curve.low, curve.high)
        style = "--" if curve.reference_task else "-"
        label = f"{curve.label} (n={curve.runs})" + (f"\n[{curve.note}]" if curve.note else "")
        line, = ax.plot(curve.steps, centre, style, marker="o", markersize=3, label=label)
        ax.fill_between(curve.steps, low, high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel(f"{metric} (IQM, 95% CI)" if iqm else metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax


def plot_aggregate(table: pd.DataFrame, ax) -> None:
    """The cross-task IQM of normalised scores with its 95 % CI, one bar per group (and reference).

    table: a summary table with ``AGGREGATE`` rows.
    ax: matplotlib axes."""
    rows = table.loc[AGGREGATE]
    positions = np.arange(len(rows))
    errors = np.vstack([rows.IQM - rows["IQM 95% CI low"], rows["IQM 95% CI high"] - rows.IQM])
    ax.errorbar(rows.IQM, positions, xerr=errors, fmt="o", capsize=4)
    ax.set_yticks(positions, [f"{label} (n={int(n)})" for label, n in zip(rows.index, rows.runs, strict=True)],
                  fontsize=7)
    ax.set_xlabel("IQM of final score (return / 1000), stratified-bootstrap 95% CI")
    ax.set_ylim(-0.5 if len(rows) > 1 else -1.0, len(rows) - 0.5 if len(rows) > 1 else 1.0)
    ax.set_title(AGGREGATE, fontsize=9)
    ax.grid(alpha=0.3)


def plot_comparison(curves: list[GroupCurve], references: list[GroupCurve], metric: str | dict[str, str],
                    experiment: str,
                    table: pd.DataFrame | None = None):
    """One row per task: mean and min–max band (left), IQM and 95 % CI (right), references beside the runs;
    a last row with the cross-task aggregate when ``table`` has one.

    curves: the runs' curves.
    references: published curves (may be empty).
    metric: y-axis label, or task → label.
    experiment: the experiment name, for the titles.
    table: the summary table, or None."""
    import matplotlib.pyplot as plt

    tasks = sorted({c.task for c in curves})
    has_aggregate = table is not None and AGGREGATE in table.index.get_level_values(0)
    rows = len(tasks) + int(has_aggregate)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4 * rows), squeeze=False)
    for row, task in enumerate(tasks):
        shown = [c for c in curves if c.task == task] + [r for r in references if r.task == task]
        name = task if task == experiment else f"{experiment}: {task}"
        label = metric if isinstance(metric, str) else metric[task]
        plot_curves(shown, label, f"{name}: mean and min–max over runs", axes[row, 0])
        plot_curves(shown, label, f"{name}: IQM over runs, stratified-bootstrap 95% CI", axes[row, 1], iqm=True)
    if has_aggregate:
        plot_aggregate(table, axes[-1, 0])
        axes[-1, 1].axis("off")
    fig.tight_layout()
    return fig


def compare(experiment: str, metric: str | None = None, group_by: str = DEFAULT_GROUP,
            tracking_uri: str = DEFAULT_TRACKING_URI, out: Path | None = None, reference_source: str | None = None,
            reps: int = aggregates.DEFAULT_REPS):
    """Find, group, aggregate and plot; returns (curves, summary table, figure).

    experiment: MLflow experiment name.
    metric: MLflow metric key, or None for each task's published metric (``reference.published_metric``).
    group_by: the run column whose values name the groups.
    tracking_uri: MLflow tracking URI.
    out: PNG path, or None to write nothing.
    reference_source: ``paper`` to add the published curves of the same tasks, or None.
    reps: bootstrap replications of the IQM confidence intervals."""
    return compare_runs(find_runs(experiment, tracking_uri, group_by), experiment, metric, tracking_uri, out,
                        reference_source, reps)


def compare_runs(runs: pd.DataFrame, title: str, metric: str | None = None,
                 tracking_uri: str = DEFAULT_TRACKING_URI, out: Path | None = None,
                 reference_source: str | None = None, reps: int = aggregates.DEFAULT_REPS):
    """``compare`` on runs already found (``find_runs``, possibly filtered or regrouped by the caller).

    runs: from ``find_runs``, with its ``group`` and ``task`` columns.
    title: the figure's title (``compare`` gives the experiment's name).
    metric, tracking_uri, out, reference_source, reps: as for ``compare``."""
    matches = reference_matches(runs, reference_source) if reference_source else {}
    metrics = task_metrics(runs, metric)
    published = {task: reference.published_metric(task) for task in matches}
    unlike = {task: name for task, name in published.items() if metrics[task] != name}
    if unlike:  # e.g. returns beside published success rates: different units on one axis
        raise CompareError(f"--metric {metric} cannot be compared with the published curves of {sorted(unlike)}, "
                           f"which measure {sorted(set(unlike.values()))}; leave --metric out (each task's published "
                           "metric) or drop --reference")
    histories = metric_histories(runs, metrics, tracking_uri)
    curves = group_curves(runs, histories, reps)
    references = reference_curves(curves, matches, reps)
    table = summary_table(runs, histories, metric_label(metrics), curves, references, reps)
    fig = plot_comparison(curves, references, metrics, title, table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    return curves, table, fig


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (2 for unknown names).

    argv: arguments (default: ``sys.argv[1:]``)."""
    parser = make_parser("dime_lightning.compare", __doc__)
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (default name: the env id)")
    parser.add_argument("--metric", default=None, help="default: each task's published metric (eval/success_rate "
                        "for the MyoSuite hand tasks, eval/return_mean otherwise)")
    parser.add_argument("--group_by", default=DEFAULT_GROUP, help="a run column, e.g. params.seed_everything")
    parser.add_argument("--tracking_uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--out", type=Path, default=Path("curves.png"))
    parser.add_argument("--reference", choices=sorted(reference.SOURCES), default=None,
                        help="draw the published curves of the same tasks (paper: the DIME authors' 10 seeds)")
    parser.add_argument("--reps", type=int, default=aggregates.DEFAULT_REPS, help="bootstrap replications")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table as CSV")
    args = parse(parser, argv, renamed=("--group_by", "--tracking_uri"))
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        _, table, _ = compare(args.experiment, args.metric, args.group_by, uri, args.out, args.reference, args.reps)
    except CompareError as err:
        sys.stderr.write(f"dime_lightning.compare: error: {err}\n")
        return 2
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    if args.csv is not None:
        table.to_csv(args.csv)
        print(f"wrote {args.csv}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
