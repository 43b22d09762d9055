"""``twist label MODEL FOLDER --out T.csv``: label every image of a folder (``twist_core.label.labeller``).

Several processes: ``torchrun --nproc_per_node N -m twist_core.commands.label ...`` (or ``-m twist_core.label``).
"""

from __future__ import annotations

import argparse
import errno
import sys

from twist_core.commands import run_command
from twist_core.config import command_parser
from twist_core.label.labeller import LabelConfig, label_folder
from twist_core.label.labeller import __doc__ as DOC
from twist_core.label.table import labels_paths, skipped_path
from twist_core.outputs import TABLE, TREE, Output, check_outputs
from twist_core.report import print_written

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def build_parser() -> argparse.ArgumentParser:
    return command_parser("twist label", DOC, LabelConfig, positional=("model", "folder"))


def label_and_print(config: LabelConfig) -> int:
    check_outputs([Output("--out", config.out, TABLE), Output("--export-tree", config.export_tree, TREE)],
                  inputs=[config.model, config.folder], within=[config.folder])
    summary = label_folder(config)
    if "rows" in summary:
        print(f"labelled {summary['labelled']} images ({summary['errors']} unreadable) into "
              f"{summary['table']} at {summary['images_per_s']:.0f} img/s this run", file=sys.stderr)
        if summary["unreadable_folders"]:
            folders = summary["unreadable_folders"]
            print(f"{len(folders)} folder(s) could not be read and were skipped: {', '.join(folders[:5])}"
                  f"{' ...' if len(folders) > 5 else ''} (listed in {summary['skipped']})", file=sys.stderr)
        embeddings, meta = labels_paths(config.out)
        print_written([(config.out, "one row per image: cluster, confidence, top clusters"),
                       (embeddings, "one embedding per row, for twist index"),
                       (meta, "the model, the folder and the counts it was made with"),
                       (skipped_path(config.out), "images and folders that could not be read (empty: none)"),
                       *([(config.export_tree, f"the images in one folder per cluster ({config.tree_mode}s)")]
                         if config.export_tree else [])],
                      next_step=f"twist index {config.out} --model {config.model} --out INDEX")
    return 0


def explain(error: BaseException, config: LabelConfig | None) -> str | None:
    """A full disk is not the user's mistake to debug: say what happened and that a rerun continues."""
    if not isinstance(error, OSError) or error.errno not in DISK_FULL:
        return None
    out = config.out if config else "the table"
    return (f"cannot write beside {out}: {error.strerror or error} (disk full or over a size limit); free some "
            "space and run the same command again: it continues where it stopped")


def main(argv: list[str] | None = None) -> int:
    return run_command("twist label", build_parser(), LabelConfig, argv, label_and_print, explain)


if __name__ == "__main__":
    sys.exit(main())
