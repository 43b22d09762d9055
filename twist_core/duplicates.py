"""``twist duplicates INDEX --threshold 0.95``: groups of near-identical images in an index."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from twist_core.config import add_dataclass_arguments, build_config, option
from twist_core.index import IndexReader, find_duplicates
from twist_core.index_store import IndexUserError
from twist_core.io_utils import atomic_write_text
from twist_core.search import format_hits, hit_dict


@dataclass
class DuplicatesConfig:
    index: str = option(None, "index folder written by twist index")
    threshold: float = option(0.95, "cosine similarity at or above which two images count as near-duplicates")
    device: str = option("auto", "where FAISS runs", choices=["auto", "cpu", "cuda"])
    json: str | None = option(None, "also write the groups to this JSON file")
    state_dir: str | None = option(None, "the app's state folder, whose cluster names are shown; default: INDEX")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twist duplicates", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_arguments(parser, DuplicatesConfig, positional=("index",))
    args = parser.parse_args(argv)
    try:
        config = build_config(DuplicatesConfig, args)
        if not config.index:
            raise IndexUserError("give the INDEX folder")
        if not -1.0 <= config.threshold <= 1.0:
            raise IndexUserError(f"--threshold is a cosine similarity in [-1, 1], got {config.threshold}")
        index = IndexReader.open(config.index, config.device, config.state_dir)
        try:
            groups = find_duplicates(index, config.threshold)
        finally:
            index.close()
    except (IndexUserError, ValueError, OSError) as error:
        print(f"twist duplicates: error: {error}", file=sys.stderr)
        return 1
    for number, group in enumerate(groups, 1):
        print(f"group {number}: {len(group)} images\n{format_hits(group)}\n")
    print(f"{len(groups)} groups, {sum(len(g) for g in groups)} images at cosine >= {config.threshold}")
    if config.json:
        atomic_write_text(config.json, json.dumps({"index": config.index, "threshold": config.threshold,
                                                   "groups": [[hit_dict(h) for h in g] for g in groups]},
                                                  indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
