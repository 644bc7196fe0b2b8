"""The `raymed` command line (also `python -m raymed`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raymed.console import command_session, error, say
from raymed.errors import RaymedError, last_line


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with command_session(verbose=args.verbose) as console:
            return _run(args, console)
    except RaymedError as err:  # a bad RAYMED_LOG_LEVEL
        print(f"raymed: error: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, console) -> int:
    """The command; its errors on the terminal, with the log file's path once there is one
    (their tracebacks go there; verbose, an unexpected error is raised as it is)."""
    try:
        return args.run(args)
    except RaymedError as err:
        error(f"raymed: error: {err}", exc=err)
        return 1
    except KeyboardInterrupt:
        error("raymed: interrupted")
        return 130
    except Exception as err:
        if console.verbose:
            raise
        error(f"raymed: error: {type(err).__name__}: {last_line(err)}", exc=err)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raymed",
        description="Fine-tune and serve a medical-assistant language model with Ray.",
    )
    _add_verbose_flag(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    assets = commands.add_parser(
        "assets",
        help="build the default model, tokenizer, corpus and eval set into RAYMED_CACHE",
        description="Build (or check) the offline default assets. Idempotent: what is "
        "already built and intact is left alone; a missing, truncated or corrupt entry is rebuilt.",
    )
    assets.add_argument("--cache", type=Path, help="cache directory (default: $RAYMED_CACHE or ~/.cache/raymed)")
    assets.add_argument("--only", nargs="+", metavar="ASSET", help="build only these (model, gpt2-tokenizer, corpus)")
    assets.add_argument("--seed", type=int, default=0, help="seed for the corpus split and wording (default 0)")
    assets.add_argument("--force", action="store_true", help="rebuild even what is present")
    assets.add_argument("--check", action="store_true", help="verify checksums only, build nothing")
    assets.set_defaults(run=_run_assets)

    data = commands.add_parser("data", help="the Ray Data corpus pipeline")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    inspect = data_commands.add_parser(
        "inspect",
        help="rows, tokens, shape, bad rows, packing efficiency and a length histogram",
        description="Run the data pipeline on PATH (a file, directory, URI or a cached corpus "
        "name such as medical-v1) on a local Ray (or RAY_ADDRESS) and report what it made.",
    )
    inspect.add_argument("path")
    inspect.add_argument("--plot", type=Path, metavar="PNG", help="also write a token-length histogram")
    _add_config_args(inspect)
    inspect.set_defaults(run=_run_data_inspect)

    train = commands.add_parser(
        "train",
        help="fine-tune (or pretrain) with Ray Train; a rerun with the same run name resumes",
        description="Run the data stage, then a TorchTrainer (DDP: gloo on CPU, NCCL on GPU). "
        "Checkpoints go to <storage_path>/runs/<run_name>/train/.",
    )
    _add_config_args(train)
    train.set_defaults(run=_run_train)

    sweep = commands.add_parser(
        "tune",
        help="a Ray Tune sweep (learning rate, warmup, any field) with ASHA early stopping",
        description="Sample the config's tune.space (or --space FILE), run each sample as a Ray "
        "Train trial, stop weak ones early (ASHA), and write results.csv, curves.png and best.json "
        "under <storage_path>/runs/<run_name>/tune/.",
    )
    _add_config_args(sweep)
    sweep.add_argument("--space", type=Path, metavar="YAML",
                       help="a sweep file: tune fields (space, metric, num_samples, ...), e.g. tune/spaces/lr-warmup.yaml")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this run_name")
    sweep.add_argument("--no-promote", action="store_true",
                       help="stop after the sweep (default: hand the best checkpoint to the promotion gate)")
    sweep.set_defaults(run=_run_tune)

    from raymed.index.cli import add_index_command  # the knowledge index (issue 22)

    add_index_command(commands, _add_config_args)
    from raymed.tokenizer.cli import add_tokenizer_command  # tokenizers trained on a corpus (issue 21)

    add_tokenizer_command(commands, _add_config_args)
    from raymed.distill.cli import add_distill_command  # teacher → student (issue 21)

    add_distill_command(commands, _add_config_args)

    evaluate = commands.add_parser(
        "eval",
        help="validation loss/perplexity/token accuracy and multiple-choice accuracy of a model",
        description="Score MODEL (a Hugging Face directory or a training checkpoint) with Ray Data batch "
        "inference: val_loss, val_ppl and val_token_acc on the validation split, mcq_acc overall, per split "
        "and per source on the eval items. With --base, both models on the same items, with a paired-"
        "bootstrap confidence interval for each accuracy difference. Writes eval.json and eval.md.",
    )
    evaluate.add_argument("--model", required=True, metavar="DIR", help="the model to evaluate")
    evaluate.add_argument("--base", metavar="DIR", help="a reference model to compare with (e.g. the base model)")
    evaluate.add_argument("--data", metavar="PATH", help="score the validation metrics on all of PATH "
                          "(default: the config's validation split)")
    evaluate.add_argument("--items", metavar="PATH", help="multiple-choice items (default: eval.mcq_path)")
    evaluate.add_argument("--max-items", type=int, metavar="N", help="a seeded sample of N items")
    evaluate.add_argument("--no-validation", action="store_true", help="multiple-choice accuracy only")
    evaluate.add_argument("--grounded", action="store_true", help="multiple-choice accuracy with and without the "
                          "knowledge index's passages (as the server adds them) and the retriever's recall@k; "
                          "writes grounded.json/grounded.md")
    evaluate.add_argument("--out", type=Path, metavar="DIR",
                          help="where eval.json/eval.md go (default: <storage_path>/runs/<run_name>/eval)")
    _add_config_args(evaluate)
    evaluate.set_defaults(run=_run_eval)

    promote = commands.add_parser(
        "promote",
        help="evaluate candidates against the registry's current version; promote the best if it passes the gate",
        description="Evaluate each candidate (model directory, checkpoint, or a run directory holding "
        "checkpoint_* directories) and the registry's current version (the base model, registered as v1 on "
        "first use) on the same data. The best candidate on eval.gate_metric is promoted only if it beats the "
        "current version and does not regress significantly on the held-out split.",
    )
    promote.add_argument("--candidate", nargs="+", required=True, metavar="DIR", help="candidate models")
    promote.add_argument("--source", help="the run or trial the candidates come from (recorded in the manifest)")
    promote.add_argument("--out", type=Path, metavar="DIR",
                         help="where eval.json/eval.md go (default: <storage_path>/runs/<run_name>/promote)")
    _add_config_args(promote)
    promote.set_defaults(run=_run_promote)

    registry = commands.add_parser("registry", help="list, show or roll back promoted models")
    registry_commands = registry.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    listing = registry_commands.add_parser("list", help="every version, its gate metrics and which is current")
    _add_config_args(listing)
    listing.set_defaults(run=_run_registry_list)
    show = registry_commands.add_parser("show", help="a version's manifest (default: current)")
    show.add_argument("version", nargs="?")
    _add_config_args(show)
    show.set_defaults(run=_run_registry_show)
    rollback = registry_commands.add_parser(
        "rollback", help="point current at VERSION (default: the one before current); the next deploy serves it")
    rollback.add_argument("version", nargs="?")
    _add_config_args(rollback)
    rollback.set_defaults(run=_run_registry_rollback)

    from raymed.serve.cli import add_serve_commands

    add_serve_commands(commands, _add_config_args)

    pipeline = commands.add_parser(
        "pipeline",
        help="assets → data → train or sweep → evaluate → promote → deploy → one answer; reruns skip finished stages",
        description="Run every stage under <storage_path>/runs/<run_name>/ on a local Ray (or RAY_ADDRESS), "
        "deploy the registry's current version on Serve and print its answer to pipeline.question. A stage "
        "whose inputs (config fields, data, upstream stages) are unchanged since it last finished is skipped. "
        "Without --config: the gpu preset when CUDA is available, else cpu-demo. On a local Ray it then serves "
        "until Ctrl-C; on a cluster (RAY_ADDRESS, a job) the deployment stays up after it returns.",
    )
    pipeline.add_argument("--no-serve", action="store_true",
                          help="shut Serve down after the answer instead of leaving the assistant serving")
    _add_config_args(pipeline)
    pipeline.set_defaults(run=_run_pipeline)

    config = commands.add_parser(
        "config",
        help="validate a config and print it resolved",
        description="Load a preset or YAML file, apply --set overrides, validate, print as YAML.",
    )
    _add_config_args(config)
    config.set_defaults(run=_run_config)
    for command in _leaf_parsers(parser):
        _add_verbose_flag(command, default=argparse.SUPPRESS)  # after the command too: `raymed pipeline -v`
    return parser


def _add_verbose_flag(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="print Ray's, Ray Data's, Ray Train's and Serve's own output here too, instead of "
                        "only to the run's raymed.log (also: RAYMED_LOG_LEVEL=DEBUG|INFO|...)")


def _leaf_parsers(parser: argparse.ArgumentParser):
    """Every command's own parser (`data inspect`, not `data`)."""
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for child in action.choices.values():
            yield from (_leaf_parsers(child) if child._subparsers else [child])


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    from raymed.config import preset_names

    parser.add_argument(
        "--config", default=None, help=f"a YAML path or a preset: {', '.join(preset_names())}"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a field, e.g. --set train.lr=3e-4 (repeatable)",
    )


def _run_assets(args: argparse.Namespace) -> int:
    from raymed.assets import ASSET_NAMES, build_assets, check_assets

    if args.check:
        statuses = check_assets(args.cache, seed=args.seed)
    else:
        names = tuple(args.only) if args.only else ASSET_NAMES
        statuses = build_assets(args.cache, names, seed=args.seed, force=args.force)
    for status in statuses:
        say(f"{status.name:15} {status.state:8} {', '.join(str(p) for p in status.paths)}")
        _print_summary(status.summary)
    bad = [s.name for s in statuses if s.state not in ("built", "present")]
    if bad:
        raise RaymedError(f"not usable: {', '.join(bad)}: run `raymed assets` to rebuild")
    return 0


def _print_summary(summary: dict, indent: str = "    ") -> None:
    for key, value in summary.items():
        if isinstance(value, dict):
            say(f"{indent}{key}:")
            _print_summary(value, indent + "  ")
        else:
            say(f"{indent}{key}: {value}")


def _run_data_inspect(args: argparse.Namespace) -> int:
    from raymed.config import load_config
    from raymed.data.inspect import plot, report
    from raymed.data.pipeline import build_datasets

    config = load_config(args.config, [*args.overrides, f"data.train_path={args.path}"])
    _ray_init(config)
    _, stats = build_datasets(config)
    say(report(args.path, stats))
    if args.plot:
        plot(stats, args.plot)
        say(f"histogram written to {args.plot}")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from raymed.config import load_config
    from raymed.data.pipeline import build_datasets
    from raymed.train import fit

    config = load_config(args.config, args.overrides)
    from raymed.train.progress import training_progress

    _ray_init(config)
    datasets, _ = build_datasets(config)
    with training_progress(config):
        result = fit(config, datasets)
    say(f"final metrics: {result.metrics}")
    say(f"latest checkpoint: {result.checkpoint.path if result.checkpoint else 'none'}")
    return 0


def _run_tune(args: argparse.Namespace) -> int:
    from raymed.config import load_config, read_yaml
    from raymed.data.pipeline import build_datasets
    from raymed.sweep import format_table, run_sweep

    sections = {"tune": read_yaml(args.space)} if args.space else None
    config = load_config(args.config, args.overrides, sections)
    from raymed.train.progress import training_progress

    _ray_init(config)
    datasets, _ = build_datasets(config)
    with training_progress(config, sweep=True):
        result = run_sweep(config, datasets, resume=args.resume)
    say(format_table(config, result))
    say(f"results: {result.directory / 'results.csv'}, learning curves: {result.directory / 'curves.png'}")
    say(f"best trial {result.best.trial}: {config.tune.metric} {result.best.best:.4f} at step "
          f"{result.best.best_step}, checkpoint {result.best.best_checkpoint}")
    if not args.no_promote:
        from raymed.promote import describe, promote_best

        promotion = promote_best([result.best.best_checkpoint], config,
                                 source=f"{config.run_name}/tune/{result.best.trial}",
                                 out_dir=result.directory / "promote")
        say(describe(promotion))
        say(f"current: {promotion.current}; report: {promotion.report_path}")
    return 0


def _ray_init(config) -> None:
    """Join RAY_ADDRESS's cluster, or start a local one; quiet, Ray's output goes to the run
    directory's raymed.log."""
    from raymed.console import start_ray
    from raymed.pipeline import run_dir

    start_ray(run_dir(config))


def _run_eval(args: argparse.Namespace) -> int:
    from raymed.config import load_config
    from raymed.eval import evaluate, render_table, resolve_model_dir

    overrides = list(args.overrides)
    if args.data:
        overrides += [f"data.train_path={args.data}", f"data.validation_path={args.data}"]
    if args.items:
        overrides.append(f"eval.mcq_path={args.items}")
    if args.max_items is not None:
        overrides.append(f"eval.max_items={args.max_items}")
    config = load_config(args.config, overrides)
    for model in filter(None, (args.model, args.base)):
        resolve_model_dir(model)  # a bad directory fails before Ray starts
    _ray_init(config)
    if args.grounded:
        from raymed.index.evaluate import run_grounded_eval

        return run_grounded_eval(config, args.model, args.base, args.out)
    report, path = evaluate(config, args.model, base=args.base, out_dir=args.out, validation=not args.no_validation)
    say(render_table(report))
    say(f"\nwrote {path} and {path.with_name('eval.md')}")
    return 0


def _run_promote(args: argparse.Namespace) -> int:
    from raymed.config import load_config
    from raymed.eval import find_checkpoints
    from raymed.promote import describe, promote_best

    config = load_config(args.config, args.overrides)
    for candidate in args.candidate:
        find_checkpoints(candidate)  # a bad directory fails before Ray starts
    _ray_init(config)
    result = promote_best(args.candidate, config, source=args.source, out_dir=args.out)
    say(describe(result))
    say(f"current: {result.current}; report: {result.report_path}")
    return 0


def _registry(args: argparse.Namespace):
    from raymed.config import load_config
    from raymed.registry import Registry

    return Registry.for_config(load_config(args.config, args.overrides))


def _run_registry_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    versions = registry.versions()
    if not versions:
        say(f"registry {registry.root} is empty (the base model is registered as v1 on first use)")
        return 0
    current = registry.current()
    say(f"{'':2}{'version':8} {'created':21} {'val_loss':>9} {'mcq_acc':>8}  source")
    for version in versions:
        manifest = registry.manifest(version)
        metrics, source = manifest.get("metrics") or {}, manifest.get("source") or {}
        origin = source.get("checkpoint") or source.get("base_model") or ""
        if source.get("trial"):
            origin = f"{source['trial']}: {origin}"
        say(f"{'*' if version == current else '':2}{version:8} {manifest.get('created', ''):21} "
              f"{_metric(metrics, 'val_loss'):>9} {_metric(metrics, 'mcq_acc'):>8}  {origin}")
    say(f"\n* current ({registry.root / 'current'})")
    return 0


def _metric(metrics: dict, name: str) -> str:
    return f"{metrics[name]:.4f}" if name in metrics else "-"


def _run_registry_show(args: argparse.Namespace) -> int:
    import json

    registry = _registry(args)
    version = args.version or registry.current()
    if version is None:
        raise RaymedError(f"registry {registry.root} is empty")
    say(json.dumps({"path": str(registry.path(version)), **registry.manifest(version)}, indent=1))
    return 0


def _run_registry_rollback(args: argparse.Namespace) -> int:
    old, new = _registry(args).rollback(args.version)
    say(f"current: {old} → {new} (the next deploy serves {new})")
    return 0


def _run_pipeline(args: argparse.Namespace) -> int:
    import os

    from raymed.config import load_config
    from raymed.pipeline import run_pipeline

    source = args.config or _hardware_preset()
    config = load_config(source, args.overrides)  # a bad or missing config fails before Ray starts
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    _ray_init(config)
    result = run_pipeline(config)
    deployment = result.stages["deploy"].outputs
    if args.no_serve:
        from ray import serve

        serve.shutdown()
        say(f"raymed: pipeline done ({result.directory}); Serve stopped (--no-serve)")
        return 0
    say(f"raymed: pipeline done ({result.directory}); serving {deployment['model']} "
          f"{deployment['version'] or ''} at {deployment['url']}")
    if not on_cluster:
        from raymed.serve.cli import serve_until_interrupted

        serve_until_interrupted()  # the local Ray, and Serve with it, ends with this process
    return 0


def _hardware_preset() -> str:
    import torch

    preset = "gpu" if torch.cuda.is_available() else "cpu-demo"
    say(f"raymed: no --config given: using the {preset} preset")
    return preset


def _run_config(args: argparse.Namespace) -> int:
    from raymed.config import dump_yaml, load_config

    say(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0
