"""Arguments several commands share."""
from __future__ import annotations

from arflow_scale.data.storage import parse_storage_options

__all__ = ["add_storage_option", "parse_storage_options"]


def add_storage_option(parser) -> None:
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option (e.g. endpoint_url=http://127.0.0.1:9000); repeatable")
