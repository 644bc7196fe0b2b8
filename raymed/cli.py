"""The `raymed` command line (also `python -m raymed`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raymed.errors import RaymedError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except RaymedError as err:
        print(f"raymed: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raymed: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raymed",
        description="Fine-tune and serve a medical-assistant language model with Ray.",
    )
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

    serve_cmd = commands.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API (Ray Serve) until Ctrl-C",
        description="Deploy the Serve app (autoscaled model replicas behind a FastAPI ingress) on a "
        "local Ray (or RAY_ADDRESS), print its URL, and run until Ctrl-C. Settings: the serve section "
        "(serve.model, serve.port, serve.max_replicas, ...); RAYMED_API_KEY turns auth on.",
    )
    _add_config_args(serve_cmd)
    serve_cmd.set_defaults(run=_run_serve)

    config = commands.add_parser(
        "config",
        help="validate a config and print it resolved",
        description="Load a preset or YAML file, apply --set overrides, validate, print as YAML.",
    )
    _add_config_args(config)
    config.set_defaults(run=_run_config)
    return parser


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
        print(f"{status.name:15} {status.state:8} {', '.join(str(p) for p in status.paths)}")
        _print_summary(status.summary)
    bad = [s.name for s in statuses if s.state not in ("built", "present")]
    if bad:
        raise RaymedError(f"not usable: {', '.join(bad)}: run `raymed assets` to rebuild")
    return 0


def _print_summary(summary: dict, indent: str = "    ") -> None:
    for key, value in summary.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_summary(value, indent + "  ")
        else:
            print(f"{indent}{key}: {value}")


def _run_data_inspect(args: argparse.Namespace) -> int:
    import ray

    from raymed.config import load_config
    from raymed.data.inspect import plot, report
    from raymed.data.pipeline import build_datasets

    config = load_config(args.config, [*args.overrides, f"data.train_path={args.path}"])
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    _, stats = build_datasets(config)
    print(report(args.path, stats))
    if args.plot:
        plot(stats, args.plot)
        print(f"histogram written to {args.plot}")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    import ray

    from raymed.config import load_config
    from raymed.data.pipeline import build_datasets
    from raymed.train import fit

    config = load_config(args.config, args.overrides)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    datasets, _ = build_datasets(config)
    result = fit(config, datasets)
    if result.error:
        raise RaymedError(f"training failed: {result.error}")
    print(f"final metrics: {result.metrics}")
    print(f"latest checkpoint: {result.checkpoint.path if result.checkpoint else 'none'}")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    import ray
    from ray import serve

    from raymed.config import load_config
    from raymed.serve.app import api_key, build_application

    config = load_config(args.config, args.overrides)
    application = build_application(config)  # checks the model directory before Ray starts
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    serve.run(application, name="raymed", route_prefix="/")
    shown_host = "127.0.0.1" if config.serve.host in ("0.0.0.0", "::") else config.serve.host
    print(f"raymed: serving at http://{shown_host}:{config.serve.port}/v1 "
          f"(auth {'on' if api_key(config) else 'off'}); Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C (also when started in the background)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _run_config(args: argparse.Namespace) -> int:
    from raymed.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0
