"""``twist duplicates INDEX``: groups of near-identical images in an index.

The threshold is calibrated on the index by default (``auto``): a cosine means nothing across embeddings, so
pairs count when they are far closer than images there usually are to their nearest neighbour.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from twist_core.commands import run_command
from twist_core.config import AUTO, AutoConfig, auto_option, command_parser, option
from twist_core.curate.store_file import CuratedNames
from twist_core.index.image_index import (
    AUTO_THRESHOLD_RULE,
    IndexReader,
    auto_threshold,
    find_duplicates,
    nearest_similarities,
)
from twist_core.index.metadata import IndexUserError
from twist_core.index.search import format_hits, hit_dict
from twist_core.io_utils import atomic_write_text
from twist_core.outputs import Output, check_outputs
from twist_core.report import print_written


@dataclass
class DuplicatesConfig(AutoConfig):
    index: str = option(None, "index folder written by twist index")
    threshold: float | str = auto_option(None, "cosine similarity at or above which two images count as "
                                         "near-duplicates; auto: from this index's nearest-neighbour distances, "
                                         "pairs at most half as far apart as the median nearest neighbour and "
                                         "3 robust SDs below it on the log scale")
    device: str = option("auto", "where FAISS runs", choices=["auto", "cpu", "cuda"])
    json: str | None = option(None, "also write the groups to this JSON file")
    state_dir: str | None = option(None, "the app's state folder, whose cluster names are shown; default: INDEX")


def build_parser() -> argparse.ArgumentParser:
    return command_parser("twist duplicates", __doc__, DuplicatesConfig, positional=("index",))


def duplicates(config: DuplicatesConfig) -> int:
    if not config.index:
        raise IndexUserError("give the INDEX folder")
    check_outputs([Output("--json", config.json)], inputs=[config.index, config.state_dir])
    if config.threshold != AUTO and not -1.0 <= float(config.threshold) <= 1.0:
        raise IndexUserError(f"--threshold is a cosine similarity in [-1, 1] or auto, got {config.threshold}")
    index = IndexReader.open(config.index, config.device, CuratedNames(config.index, config.state_dir))
    try:
        if config.threshold == AUTO:
            threshold, stats = auto_threshold(nearest_similarities(index))
            rule = AUTO_THRESHOLD_RULE
        else:
            threshold, stats, rule = float(config.threshold), {}, "given (--threshold)"
        groups = find_duplicates(index, threshold)
    finally:
        index.close()
    for number, group in enumerate(groups, 1):
        print(f"group {number}: {len(group)} images\n{format_hits(group)}\n")
    if stats:
        print(f"threshold {threshold:.6f} (auto): {rule}; the median nearest neighbour is at cosine "
              f"{stats.get('nearest_similarity_median', 'n/a')} over {stats['images_measured']} images")
    print(f"{len(groups)} groups, {sum(len(g) for g in groups)} images at cosine >= {threshold:.6g}")
    if config.json:
        atomic_write_text(config.json, json.dumps({"index": config.index, "threshold": threshold,
                                                   "threshold_rule": rule, "threshold_statistics": stats,
                                                   "groups": [[hit_dict(h) for h in g] for g in groups]},
                                                  indent=1) + "\n")
        print_written([(config.json, "the groups, each image with its path and cluster")])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("twist duplicates", build_parser(), DuplicatesConfig, argv, duplicates)


if __name__ == "__main__":
    sys.exit(main())
