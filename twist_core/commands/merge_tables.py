"""``twist merge-tables OUT.csv A.csv B.csv ...``: one labels table from shards (``twist_core.label.merge_tables``)."""

from __future__ import annotations

import argparse
import sys

from twist_core.commands import run_command
from twist_core.config import command_parser
from twist_core.label.merge_tables import MergeConfig, merge_tables
from twist_core.label.merge_tables import __doc__ as DOC
from twist_core.label.table import labels_paths, skipped_path
from twist_core.outputs import TABLE, Output, check_outputs
from twist_core.report import print_written


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("twist merge-tables", DOC, MergeConfig, positional=("out",))
    parser.add_argument("tables", nargs="+", help="the shards' tables (twist label outputs), in order")
    return parser


def merge_and_print(config: MergeConfig) -> int:
    check_outputs([Output("OUT", config.out, TABLE)], inputs=config.tables)
    meta = merge_tables(config)
    print(f"merged {len(config.tables)} tables into {config.out}: {meta['rows']} rows ({meta['errors']} "
          f"unreadable) under {meta['root']}", file=sys.stderr)
    embeddings, meta_path = labels_paths(config.out)
    print_written([(config.out, "one row per image of every shard, in the order the shards were given"),
                   (embeddings, "one embedding per row, for twist index"),
                   (meta_path, "the model, the common folder and the counts"),
                   (skipped_path(config.out), "images and folders the shards could not read")],
                  next_step=f"twist index {config.out} --out INDEX")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("twist merge-tables", build_parser(), MergeConfig, argv, merge_and_print)


if __name__ == "__main__":
    sys.exit(main())
