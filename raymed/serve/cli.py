"""`raymed serve` and `raymed chat`: the assistant over HTTP, and a terminal client for it
(raymed.cli adds them)."""

from __future__ import annotations

import argparse
import os

from raymed.console import say


def add_serve_commands(commands, add_config_args) -> None:
    """The `serve` and `chat` subcommands, on the main parser's subcommands."""
    serve_cmd = commands.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API (Ray Serve) until Ctrl-C",
        description="Deploy the Serve app (autoscaled model replicas behind a FastAPI ingress) on a "
        "local Ray (or RAY_ADDRESS), print its URL, and run until Ctrl-C. Settings: the serve section "
        "(serve.model, serve.port, serve.max_replicas, ...); RAYMED_API_KEY turns auth on.",
    )
    serve_cmd.add_argument(
        "--deploy", action="store_true",
        help="deploy (or roll forward to the registry's current version) on the running cluster "
        "(RAY_ADDRESS) and return; replicas are replaced without failing requests in flight")
    add_config_args(serve_cmd)
    serve_cmd.set_defaults(run=run_serve)

    chat = commands.add_parser(
        "chat",
        help="chat with the served model in the terminal (answers stream in, with the safety banner)",
        description="A terminal client for `raymed serve`: streams each answer as it is generated, shows "
        "the emergency banner the server attaches to a red-flag question and the disclaimer.",
    )
    chat.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the API base URL (default: %(default)s)")
    chat.add_argument("--api-key", default=None, help="the server's API key (default: $RAYMED_API_KEY)")
    chat.add_argument("--model", default=None, help="the model name (default: the one the server serves)")
    chat.add_argument("--max-tokens", type=int, default=None, help="answer length cap (default: the server's)")
    chat.add_argument("--temperature", type=float, default=None,
                      help="sampling temperature (default: the served model's own, from its generation config)")
    chat.add_argument("-m", "--message", dest="messages", action="append", default=[], metavar="TEXT",
                      help="ask TEXT and exit (repeatable: one conversation); without it, read questions from stdin")
    chat.set_defaults(run=run_chat)


def run_serve(args: argparse.Namespace) -> int:
    from raymed.config import load_config
    from raymed.console import open_log
    from raymed.pipeline import run_dir
    from raymed.serve.deploy import deploy

    config = load_config(args.config, args.overrides)
    open_log(run_dir(config))  # Ray itself starts once the model is found
    deployment = deploy(config)
    version = f" {deployment.version}" if deployment.version else ""
    say(f"raymed: serving {deployment.model}{version} at {deployment.url} "
        f"(auth {'on' if deployment.auth else 'off'}); chat page at {deployment.url.removesuffix('/v1')}/")
    if args.deploy:
        return 0
    serve_until_interrupted()


def serve_until_interrupted() -> None:
    """Wait for Ctrl-C (or SIGTERM), then shut Serve down."""
    import signal
    import time

    from ray import serve

    say("raymed: Ctrl-C stops")
    signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C (also when started in the background)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_chat(args: argparse.Namespace) -> int:
    from raymed.chat import ChatClient, run_chat as chat

    client = ChatClient(args.url, api_key=args.api_key or os.environ.get("RAYMED_API_KEY") or None,
                        model=args.model, max_tokens=args.max_tokens, temperature=args.temperature)
    return chat(client, args.messages)
