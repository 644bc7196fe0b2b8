"""`raymed distill`: a teacher distilled into a smaller student (raymed.cli adds it)."""

from __future__ import annotations

import argparse


def add_distill_command(commands, add_config_args) -> None:
    """The `distill` subcommand, on the main parser's subcommands."""
    distill = commands.add_parser(
        "distill",
        help="distill a teacher (the registry's current version by default) into a smaller student with Ray Train",
        description="Take the student from the teacher's layers (distill.student_layers) or the model section, train "
        "it on the data stage's blocks with loss (1 - alpha)·CE + alpha·T²·KL(teacher ‖ student) (distill.alpha, "
        "distill.temperature), then promote it into its own registry model (distill.registry_name, default "
        "<registry.name>-small) if it beats that model's current version. A rerun with the same run_name resumes.")
    distill.add_argument("--no-promote", action="store_true", help="stop after training")
    add_config_args(distill)
    distill.set_defaults(run=run_distill)


def run_distill(args: argparse.Namespace) -> int:
    from raymed.cli import _ray_init
    from raymed.config import load_config
    from raymed.console import say
    from raymed.distill.run import distill, serve_hint
    from raymed.promote import describe
    from raymed.train.progress import training_progress

    config = load_config(args.config, args.overrides)
    _ray_init(config)
    done = distill(config, promote=not args.no_promote, progress=training_progress)
    say(f"teacher: {done.config.distill.teacher}")
    say(f"final metrics: {done.result.metrics}")
    say(f"latest checkpoint: {done.result.checkpoint.path if done.result.checkpoint else 'none'}")
    if done.promotion:
        say(describe(done.promotion))
        say(f"{done.config.registry.name} current: {done.promotion.current}; report: {done.promotion.report_path}")
        say(serve_hint(done.config, done.promotion.current))
    return 0
