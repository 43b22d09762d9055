"""``twist finetune RUN --index IX``: continue a run with the labels set in the app (``twist_core.curate.finetune``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from twist_core.commands import run_command
from twist_core.config import command_parser
from twist_core.curate.finetune import FinetuneConfig, finetune
from twist_core.curate.finetune import __doc__ as DOC
from twist_core.layout import CLASS_NAMES_FILE, CONFIG_FILE, FINETUNE_PLAN_FILE, FINETUNE_REPORT_FILE
from twist_core.outputs import RUN, Output, check_outputs
from twist_core.train.summary import print_run_end


def build_parser() -> argparse.ArgumentParser:
    return command_parser("twist finetune", DOC, FinetuneConfig, positional=("run",))


def run_data(run: str | None) -> str | None:
    """The image folder RUN was trained on (None when RUN has no readable config: finetune says why)."""
    try:
        return json.loads((Path(str(run)) / CONFIG_FILE).read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        return None


def finetune_and_print(config: FinetuneConfig) -> int:
    if config.run:
        check_outputs([Output("--out", config.out or str(Path(config.run).resolve()) + "-finetuned", RUN)],
                      inputs=[config.run, config.index, config.state_dir, config.labels],
                      within=[config.data or run_data(config.run), config.eval_data])
    report = finetune(config)
    out = Path(report["options"]["out"])
    print(f"{out}: fine-tuned on {report['labelled_images']} labelled images "
          f"({report['excluded_images']} excluded), K {report['classes_before']} -> {report['classes_after']}")
    print_run_end(out, [(out / CLASS_NAMES_FILE, "the clusters' names, which twist export picks up"),
                        (out / FINETUNE_PLAN_FILE, "the labels this fine-tune started with (a rerun resumes them)"),
                        (out / FINETUNE_REPORT_FILE, "what was learned from: labels, exclusions, clusters kept")])
    print(f"then: twist index --update --out INDEX --model {out.name}.onnx (relabels every image, keeps their "
          "ids; the app follows)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("twist finetune", build_parser(), FinetuneConfig, argv, finetune_and_print)


if __name__ == "__main__":
    sys.exit(main())
