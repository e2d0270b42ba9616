"""The `arflow` command. Each subcommand lives in its own module exposing `register(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys

from arflow_scale.config import ConfigError

# Subcommand modules, in help order.
COMMANDS = ("demo", "model", "data", "train", "export", "sample", "fid", "sweep", "scaling",
            "submit", "jobs", "bench")


def _quiet_environment() -> None:
    """Defaults every command wants before heavy imports; the user's own settings win."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arflow", description="Train ARFlow image generators at scale.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module_name = f"{__name__}.{name}"
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        result = args.handler(args)
    except ConfigError as err:
        print(f"arflow {args.command}: configuration error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"arflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
