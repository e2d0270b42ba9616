"""Arguments several commands share."""
from __future__ import annotations

import argparse

from arflow_scale.data.storage import parse_storage_options

__all__ = ["add_storage_option", "parse_storage_options", "add_guided_channels_option", "guided_channels"]


def add_storage_option(parser) -> None:
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option (e.g. endpoint_url=http://127.0.0.1:9000); repeatable")


ALL_CHANNELS = "all"


def _guided_channels_arg(text: str):
    if text == ALL_CHANNELS:
        return ALL_CHANNELS
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of channels or 'all'") from None


def add_guided_channels_option(parser) -> None:
    parser.add_argument("--guided-channels", type=_guided_channels_arg, default=None, metavar="N|all",
                        help="classifier-free guidance on the first N channels only, or on all (default: the "
                             "run's eval.guided_channels)")


def guided_channels(arg, run_default):
    """The --guided-channels value to sample with: the run's eval.guided_channels when not given."""
    if arg is None:
        return run_default
    return None if arg == ALL_CHANNELS else arg
