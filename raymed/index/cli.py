"""`raymed index build|search`: the knowledge index from the command line (raymed.cli adds it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from raymed.console import say


def add_index_command(commands, add_config_args) -> None:
    """The `index` subcommand group, on the main parser's subcommands."""
    index = commands.add_parser("index", help="the knowledge index that grounds answers (build, search)")
    sub = index.add_subparsers(dest="index_command", required=True, metavar="COMMAND")
    build = sub.add_parser(
        "build", help="build the knowledge index into RAYMED_CACHE/index/<index.name>",
        description="Read every entry of the packaged sources (index.sources) and the user documents "
        "(index.documents, optional) with Ray Data and build a BM25 index per shard, atomically, with a "
        "manifest. Idempotent: a complete, current index is left alone (--force rebuilds it).")
    build.add_argument("--cache", type=Path, help="cache directory (default: $RAYMED_CACHE or ~/.cache/raymed)")
    build.add_argument("--documents", metavar="PATH", help="also index these documents (sets index.documents)")
    build.add_argument("--force", action="store_true", help="rebuild even when the index is present")
    add_config_args(build)
    build.set_defaults(run=run_build)
    search = sub.add_parser("search", help="print the passages a query retrieves (JSON lines)")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5, help="passages to return (default 5)")
    search.add_argument("--cache", type=Path, help="cache directory (default: $RAYMED_CACHE or ~/.cache/raymed)")
    add_config_args(search)
    search.set_defaults(run=run_search)


def run_build(args: argparse.Namespace) -> int:
    from raymed.cli import _ray_init
    from raymed.config import load_config
    from raymed.index import build_index, index_rel

    overrides = list(args.overrides) + ([f"index.documents={args.documents}"] if args.documents else [])
    config = load_config(args.config, overrides)
    _ray_init(config)
    manifest = build_index(config.index, args.cache, force=args.force)
    summary = manifest["summary"]
    took = f" in {manifest['seconds']} s" if "seconds" in manifest else ""
    say(f"index {config.index.name}: {manifest['state']}{took}; {summary['passages']} passages in "
          f"{len(summary['shards'])} shards ({', '.join(f'{k} {v}' for k, v in summary['collections'].items())})")
    root = args.cache or _default_cache()
    size = sum(p.stat().st_size for p in (root / index_rel(config.index.name)).rglob("*") if p.is_file())
    say(f"  {root / index_rel(config.index.name)} ({size / 1e6:.1f} MB)")
    return 0


def run_search(args: argparse.Namespace) -> int:
    from raymed.config import load_config
    from raymed.errors import RaymedError
    from raymed.index import open_index

    config = load_config(args.config, args.overrides)
    index = open_index(config.index, args.cache)
    try:
        hits = index.search(args.query, args.k)
    except ValueError as err:
        raise RaymedError(f"bad query: {err}") from None
    for hit in hits:
        say(json.dumps(hit, ensure_ascii=False))
    return 0


def _default_cache() -> Path:
    from raymed.assets.cache import default_cache_dir

    return default_cache_dir()
