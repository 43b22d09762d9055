"""``twist index SOURCE --out INDEX`` (or ``--update``): build or update a FAISS index (``twist_core.index.build``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twist_core.commands import run_command
from twist_core.config import command_parser
from twist_core.index.build import IndexConfig, build_index, update_index
from twist_core.index.build import __doc__ as DOC
from twist_core.index.metadata import IndexMetadata, IndexUserError, meta_path, write_failure
from twist_core.layout import FOLDER_LABELS_FILE
from twist_core.outputs import INDEX, Output, check_outputs
from twist_core.report import Written, print_written


def build_parser() -> argparse.ArgumentParser:
    return command_parser("twist index", DOC, IndexConfig, positional=("source",))


def index_and_print(config: IndexConfig) -> int:
    check_outputs([Output("--out", config.out, INDEX)], inputs=[config.source, config.model], within=[config.source])
    if config.update:
        result = update_index(config)
        if result.relabelled is None:
            print(f"{config.out}: added {result.added}, removed {result.removed} images")
        else:
            print(f"{config.out}: the model changed, so all {result.relabelled} images were labelled and embedded "
                  f"again (added {result.added}, removed {result.removed}); the app sets aside curation made for "
                  "the old model's clusters")
        print_written(index_files(config.out))
        return 0
    if not config.source:
        raise IndexUserError("give the labels table or image folder to index (or --update)")
    out = build_index(config)
    print(summary(out))
    print_written(index_files(out), next_step=f"twist app --model {config.model or 'MODEL.onnx'} --index {out}")
    return 0


def summary(out: Path) -> str:
    """What was built, from the metadata alone (the vectors are not loaded again): kind, size, recall, CPU."""
    meta = IndexMetadata(meta_path(out))
    try:
        info, size = meta.info(), meta.count()
    finally:
        meta.close()
    layout = f"{info['dim']}-d, {info['kind']} index"
    if info["kind"] != "flat":
        layout += f" (nlist {info['nlist']}, nprobe {info['nprobe']})"
    if info.get("pca_dim"):
        layout += f", stored as {info['pca_dim']}-d"
    stages = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in info.get("build_cpu_s", {}).items())
    return (f"{out}: {size} images, {layout}; recall@10 {info.get('recall_at_10')} against exact search on "
            f"{info.get('recall_queries')} queries\nCPU seconds: {stages}")


def index_files(out: str | Path) -> list[Written]:
    """The index folder, and the labels table twist index wrote there when it labelled an image folder."""
    return [(out, "the index: FAISS vectors and image metadata (manifest.json names the current files)"),
            (Path(out) / FOLDER_LABELS_FILE, "the labels table made from the image folder")]


def explain(error: BaseException, config: IndexConfig | None) -> str | None:
    """A failed write names the index folder and what to do (disk full, read-only, ...)."""
    return write_failure(error, config.out if config else "the index folder")


def main(argv: list[str] | None = None) -> int:
    return run_command("twist index", build_parser(), IndexConfig, argv, index_and_print, explain)


if __name__ == "__main__":
    sys.exit(main())
