"""Ray Tune sweeps: each trial is a Ray Train run of the config with `tune.space` sampled.

Trials run the same `fit` as `raymed train` from a per-trial driver function, which
forwards Train's reports to Tune through `TuneReportCallback` (the Ray 2.60 way; the old
`Tuner(trainer)` form is gone). ASHA stops weak trials on the validation metric, counted
in training steps. Layout under `<storage_path>/runs/<run_name>/tune/`: `sweep/` (Tune's
experiment, what `--resume` restores), `trials/<trial>/` (each trial's Ray Train run,
checkpoints included) and the results: `results.csv`, `curves.png`, `best.json`.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from raymed.config import Config, with_values
from raymed.errors import RaymedError, last_line
from raymed.train import METRICS_FILE, STATE_FILE

EXPERIMENT = "sweep"
TRIAL_FILE = "trial.json"
TRIAL_DRIVER = {"CPU": 0.01}
"""Resources of each trial's driver function (Tune's own placement group for the trial)."""


@dataclass
class TrialRow:
    """One line of the results table."""

    trial: str
    params: dict
    best: float | None
    best_step: int | None
    steps: int
    status: str  # "finished", "stopped early" or "failed: <error>"
    best_checkpoint: str | None

    def as_csv(self) -> dict:
        return {"trial": self.trial, **self.params, "best": self.best, "best_step": self.best_step,
                "steps": self.steps, "status": self.status, "best_checkpoint": self.best_checkpoint}


@dataclass
class SweepResult:
    rows: list[TrialRow]
    best: TrialRow
    directory: Path


def sweep_dir(config: Config) -> Path:
    return Path(config.storage_path).expanduser() / "runs" / config.run_name / "tune"


def run_trial(params: dict, *, config_data: dict, datasets: dict) -> None:
    """One trial: the base config with this trial's sample, trained with Ray Train; every
    validation report reaches Tune (metrics + checkpoint_path)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raymed.train import fit

    context = tune.get_context()
    trial = with_values(Config.model_validate(config_data), params)
    trial = trial.model_copy(update={"trial_name": context.get_trial_id()})
    own_dir = sweep_dir(trial) / "trials" / trial.trial_name
    own_dir.mkdir(parents=True, exist_ok=True)
    (own_dir / TRIAL_FILE).write_text(json.dumps({"tune_dir": Path(context.get_trial_dir()).name, "params": params}))
    fit(trial, datasets, callbacks=[TuneReportCallback()])


def run_sweep(config: Config, datasets: dict, *, resume: bool = False, progress: bool = True) -> SweepResult:
    """Run (or, with `resume`, continue) the sweep; then tabulate, plot and pick the best.
    `progress` prints Tune's trial table as it goes."""
    from ray import tune

    directory = sweep_dir(config)
    experiment = directory / EXPERIMENT
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, config_data=config.model_dump(), datasets=datasets),
        TRIAL_DRIVER,  # the trial driver only waits; its Train workers hold the resources
    )
    if resume:
        if not tune.Tuner.can_restore(str(experiment)):
            raise RaymedError(f"no sweep to resume at {experiment}: run without --resume to start one")
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
    else:
        if experiment.exists():
            raise RaymedError(f"a sweep already exists at {experiment}: add --resume to continue it, "
                              "or choose another run_name")
        tuner = _new_tuner(config, trainable, directory, verbose=1 if progress else 0)
    try:
        grid = tuner.fit()
    finally:
        release_leftover_reservations()
    rows = [_row(config, result) for result in grid]
    return _summarize(config, rows, directory)


def _new_tuner(config: Config, trainable, directory: Path, verbose: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sweep = config.tune
    scheduler = FIFOScheduler()
    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=config.train.max_steps,
                                  grace_period=min(sweep.grace_period, config.train.max_steps),
                                  reduction_factor=sweep.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space=search_space(config),
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
            scheduler=scheduler, search_alg=_search_algorithm(config),
        ),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(directory), verbose=verbose,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[_release_when_idle_callback()]),
    )


def release_leftover_reservations() -> None:
    """Remove this job's Ray Train worker-group placement groups (Tune's own trial groups
    are left alone). A finished or stopped trial's worker group can leave its placement
    group reserved after the trial is gone (observed with Ray 2.60), which starves later
    trials on a small cluster; call this only when no trial of this job is running."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    for pg_id, pg in placement_group_table().items():
        if (pg["state"] in ("CREATED", "PENDING") and pg_id.endswith(job)
                and TRIAL_DRIVER not in pg["bundles"].values()):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


def _release_when_idle_callback():
    from ray.tune import Callback

    class ReleaseWhenIdle(Callback):
        """After a trial ends while no other trial runs, release leftover reservations."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release_if_idle(trials, trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release_if_idle(trials, trial)

        @staticmethod
        def _release_if_idle(trials, ended):
            if not any(t.status == "RUNNING" for t in trials if t is not ended):
                release_leftover_reservations()

    return ReleaseWhenIdle()


def search_space(config: Config) -> dict:
    """`tune.space` as Tune distributions, keyed by dotted config field."""
    from ray import tune

    makers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint,
              "choice": lambda *values: tune.choice(list(values)),
              "grid": lambda *values: tune.grid_search(list(values))}
    return {field: makers[kind](*args) for field, spec in config.tune.space.items()
            for kind, args in spec.items()}


def _search_algorithm(config: Config):
    """Random search seeded by `config.seed` (the same samples every run), or Optuna; at
    most `tune.max_concurrent_trials` trials at a time either way."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    limit = config.tune.max_concurrent_trials
    if config.tune.search == "random":
        return BasicVariantGenerator(random_state=config.seed, max_concurrent=limit)
    try:
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        import optuna  # noqa: F401  (OptunaSearch imports it lazily)
    except ImportError:
        raise RaymedError("tune.search is optuna but optuna is not installed: pip install optuna") from None
    return ConcurrencyLimiter(OptunaSearch(seed=config.seed), max_concurrent=limit)


def _row(config: Config, result) -> TrialRow:
    """A trial's line: its sample, best validation figure and checkpoint, steps, fate.
    Read from the trial's own step log (flushed every step, so it survives a killed sweep
    driver), not from Tune's result files."""
    metric, sign = config.tune.metric, 1 if config.tune.mode == "min" else -1
    trial = _trial_names(config).get(Path(result.path).name, Path(result.path).name)
    params = {k: v for k, v in result.config.items() if k in config.tune.space}
    trial_dir = sweep_dir(config) / "trials" / trial
    history = _history(trial_dir / "logs" / METRICS_FILE)
    scored = {step: m[metric] for step, m in history.items() if math.isfinite(m.get(metric, math.nan))}
    if not scored:
        error = result.error or f"it reported no {metric}"
        return TrialRow(trial, params, None, None, max(history, default=0), f"failed: {last_line(error)}", None)
    best_step = min(scored, key=lambda step: sign * scored[step])
    steps = max(history)
    if result.error:
        status = f"failed: {last_line(result.error)}"
    else:
        status = "finished" if steps >= config.train.max_steps else "stopped early"
    return TrialRow(trial, params, scored[best_step], best_step, steps, status,
                    _checkpoint_at(trial_dir / trial, best_step))


def _trial_names(config: Config) -> dict[str, str]:
    """Tune's trial directory name → the trial's name under trials/ (from its trial.json)."""
    return {json.loads(p.read_text())["tune_dir"]: p.parent.name
            for p in (sweep_dir(config) / "trials").glob(f"*/{TRIAL_FILE}")}


def _history(path: Path) -> dict[int, dict]:
    """step → metrics; a step run twice (after a resume) keeps its last line."""
    if not path.is_file():
        return {}
    return {m["step"]: m for m in map(json.loads, path.read_text().splitlines())}


def _checkpoint_at(run_dir: Path, step: int) -> str | None:
    for state in run_dir.glob(f"checkpoint_*/{STATE_FILE}"):
        if json.loads(state.read_text())["step"] == step:
            return str(state.parent)
    return None


def _summarize(config: Config, rows: list[TrialRow], directory: Path) -> SweepResult:
    scored = [r for r in rows if r.best is not None and r.best_checkpoint]
    if not scored:
        failures = "; ".join(f"{r.trial}: {r.status}" for r in rows)
        raise RaymedError(f"every trial failed, none reported {config.tune.metric}: {failures}")
    sign = 1 if config.tune.mode == "min" else -1
    best = min(scored, key=lambda r: sign * r.best)
    _write_csv(rows, directory / "results.csv")
    plot_curves(config, directory / "curves.png")
    (directory / "best.json").write_text(json.dumps(best.as_csv(), indent=2) + "\n")
    return SweepResult(rows, best, directory)


def _write_csv(rows: list[TrialRow], path: Path) -> None:
    lines = [r.as_csv() for r in rows]
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(lines[0]))
        writer.writeheader()
        writer.writerows(lines)


def format_table(config: Config, result: SweepResult) -> str:
    """The results as an aligned text table, best trial marked with *."""
    fields = list(config.tune.space)
    header = ["trial", *fields, f"best {config.tune.metric}", "steps", "status"]
    lines = [header]
    for row in result.rows:
        best = "-" if row.best is None else f"{row.best:.4f}"
        mark = "*" if row is result.best else " "
        lines.append([mark + row.trial, *(_fmt(row.params.get(f)) for f in fields), best,
                      str(row.steps), row.status])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def plot_curves(config: Config, path: Path) -> None:
    """Validation metric against step for every trial (a stopped trial's line ends early)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = config.tune.metric
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for trial in sorted((sweep_dir(config) / "trials").glob("*/logs/metrics.jsonl")):
        points = [(m["step"], m[metric]) for m in map(json.loads, trial.read_text().splitlines())
                  if metric in m and math.isfinite(m[metric])]
        if points:
            steps, values = zip(*sorted(dict(points).items()))
            axes.plot(steps, values, marker="o", label=trial.parent.parent.name)
    axes.set_xlabel("step")
    axes.set_ylabel(metric)
    axes.set_title(f"{config.run_name}: {metric} by trial")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
