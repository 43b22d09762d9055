"""``twist search INDEX IMAGE -k 10``: the most similar indexed images (``twist_core.index.search``)."""

from __future__ import annotations

import argparse
import json
import sys

from twist_core.commands import run_command
from twist_core.config import command_parser
from twist_core.curate.store_file import CuratedNames
from twist_core.index.metadata import IndexUserError
from twist_core.index.search import SearchConfig, format_hits, hit_dict, no_hits_reason, search
from twist_core.index.search import __doc__ as DOC
from twist_core.io_utils import atomic_write_text
from twist_core.outputs import Output, check_outputs
from twist_core.report import print_written


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("twist search", DOC, SearchConfig, positional=("index", "image"))
    parser.add_argument("-k", dest="k", type=int, default=argparse.SUPPRESS, help="same as --k")
    return parser


def search_and_print(config: SearchConfig) -> int:
    """Exit code 1 (not an error) when nothing matched, as grep does."""
    if not config.index:
        raise IndexUserError("give the INDEX folder")
    check_outputs([Output("--json", config.json)], inputs=[config.index, config.image, config.state_dir,
                                                         config.model])
    hits = search(config, CuratedNames(config.index, config.state_dir))
    if not hits:
        print(f"twist search: {no_hits_reason(config)}", file=sys.stderr)
        return 1
    print(format_hits(hits))
    if config.json:
        query = {"image": config.image, "id": config.id, "k": config.k, "cluster": config.cluster}
        atomic_write_text(config.json, json.dumps({"index": config.index, "query": query,
                                                   "hits": [hit_dict(h) for h in hits]}, indent=1) + "\n")
        print_written([(config.json, "the query and its hits")])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("twist search", build_parser(), SearchConfig, argv, search_and_print)


if __name__ == "__main__":
    sys.exit(main())
