"""The `arflow` command. Each subcommand lives in its own module exposing `register(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import warnings

from arflow_scale.config import ConfigError
from arflow_scale.train.result import TrainingStopped

# Subcommand modules, in help order.
COMMANDS = ("demo", "model", "data", "train", "export", "sample", "fid", "sweep", "compare", "scaling",
            "submit", "jobs", "bench")


def _quiet_environment() -> None:
    """Defaults every command wants before heavy imports; the user's own settings win."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arflow", description="Train ARFlow image generators at scale.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's and the libraries' own output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module_name = f"{__name__}.{name}"
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).register(sub)
    return parser


class _ConsoleFormatter(logging.Formatter):
    """Our INFO lines as plain text; warnings and errors with their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname}: {text}"


def configure_logging(verbose: bool) -> None:
    """-v: everything at DEBUG with timestamps. Default: our INFO lines, other libraries' warnings only,
    and no Python deprecation warnings from libraries."""
    root = logging.getLogger()
    if root.handlers:  # configured by the host already (a test runner, an embedding program): as basicConfig
        return
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.setLevel(logging.DEBUG)
        return
    handler.setFormatter(_ConsoleFormatter("%(message)s"))
    root.setLevel(logging.WARNING)
    logging.getLogger("arflow_scale").setLevel(logging.INFO)
    for library in ("mlflow", "alembic", "ray"):  # they configure their own handlers at INFO
        logging.getLogger(library).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        result = args.handler(args)
    except ConfigError as err:
        print(f"arflow {args.command}: configuration error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"arflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:  # Ctrl-C or SIGTERM during training (train, sweep, compare)
        print(f"arflow {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:
        if not _no_s3_credentials(err):
            raise
        print(f"arflow {args.command}: error: no credentials for S3 storage ({err}): set AWS_ACCESS_KEY_ID and "
              "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, an instance role), or the storage_options of the config",
              file=sys.stderr)
        return 2
    return int(result or 0)


def _no_s3_credentials(err: BaseException) -> bool:
    """True for botocore's 'Unable to locate credentials' (s3fs raises it as it is), however deep in the chain."""
    from botocore.exceptions import NoCredentialsError

    for _ in range(16):  # a bounded walk: a chain may loop
        if err is None or isinstance(err, NoCredentialsError):
            return err is not None
        err = err.__cause__ or err.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
