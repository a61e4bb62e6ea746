"""The ``tandem`` command: serve, generate, tokenize, models fetch, bench."""

from __future__ import annotations

import argparse
import os
import sys

from service import client
from service import settings as settings_module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # bench has its own parser
        from bench.cli import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tandem", description="Lossless speculative decoding.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="load the model pair and serve gRPC")
    settings_module.add_arguments(serve_parser)
    generate = commands.add_parser("generate", help="send one request to a running server")
    client.add_arguments(generate)
    tokenize = commands.add_parser("tokenize", help="print the token ids a prompt becomes")
    client.add_tokenize_arguments(tokenize)
    models = commands.add_parser("models", help="manage model weights")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    fetch = models_commands.add_parser(
        "fetch", help="prepare the default pair (the models of it that serve would use)")
    fetch.add_argument(
        "--cache-dir", default=None, help="default: $TANDEM_CACHE or ~/.cache/tandem"
    )
    for role in ("target", "draft"):  # as `tandem serve` reads them
        fetch.add_argument(
            f"--{role}", default=os.environ.get(f"TANDEM_{role.upper()}", "default"),
            help=f"the {role} serve will load (default: $TANDEM_{role.upper()}, else "
            "default); the default one is fetched only where this is 'default'")
    commands.add_parser("bench", help="run benchmarks (see `tandem bench --help`)")

    args = parser.parse_args(argv)
    if args.command == "serve":
        from decoding.errors import ModelLoadError
        from service.app import serve

        settings = settings_module.from_namespace(args)
        problems = [*settings_module.unreadable_files(settings),
                    *settings_module.otel_problems(os.environ)]
        if problems:
            raise SystemExit("invalid settings: " + "; ".join(problems))
        try:
            return serve(settings)
        except ModelLoadError as err:  # a bad name, device or pair: one line, no traceback
            print(f"tandem serve: {err}", file=sys.stderr)
            return 1
    if args.command == "generate":
        return client.run(args)
    if args.command == "tokenize":
        return client.run_tokenize(args)
    if args.command == "models":
        return fetch_models(args)
    return 2


def fetch_models(args: argparse.Namespace) -> int:
    """``tandem models fetch``: the default target and draft, each where serve would load it
    (an init container beside a server given another target fetches only the default draft)."""
    from pathlib import Path

    from decoding.models import (
        DEFAULT_DRAFT_SPEC,
        DEFAULT_SOURCE,
        DEFAULT_TARGET_SPEC,
        fetch_chunked_model,
    )

    cache = Path(args.cache_dir) if args.cache_dir else None
    wanted = [(role, spec) for role, source, spec in (
        ("target", args.target, DEFAULT_TARGET_SPEC), ("draft", args.draft, DEFAULT_DRAFT_SPEC),
    ) if source == DEFAULT_SOURCE]
    if not wanted:
        print(f"nothing to fetch: neither the target ({args.target}) nor the draft "
              f"({args.draft}) is '{DEFAULT_SOURCE}'")
    for role, spec in wanted:
        print(f"{role}: {fetch_chunked_model(spec, cache)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
