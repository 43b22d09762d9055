"""``twist export RUN``: one ONNX file and its model card (``twist_core.deploy.export``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from twist_core.commands import run_command
from twist_core.config import command_parser
from twist_core.deploy.export import ExportConfig, ExportError, export_model
from twist_core.deploy.export import __doc__ as DOC
from twist_core.layout import CHECKPOINT_FILE
from twist_core.outputs import MODEL, Output, check_outputs
from twist_core.report import print_written


def build_parser() -> argparse.ArgumentParser:
    return command_parser("twist export", DOC, ExportConfig, positional=("run",))


def export_and_print(config: ExportConfig) -> int:
    if not config.run:
        raise ExportError("give the run folder or checkpoint to export (RUN)")
    run = Path(config.run)
    checkpoint = run / CHECKPOINT_FILE if run.is_dir() else run  # what the card will name, as export_model finds it
    check_outputs([Output("--out", config.out, MODEL, source=checkpoint)], inputs=[config.run, config.class_names])
    out = export_model(config)
    card = json.loads(out.with_suffix(".json").read_text())
    parity = card.get("parity_max_abs_diff")
    checked = f"max |PyTorch - ONNX| = {max(parity.values()):.2g}" if parity else "not verified"
    print(f"exported {config.run}: K={card['n_classes']}, input {card['input_size']} px, {checked}")
    print_written([(out, "the model (onnxruntime: embedding and probs)"),
                   (out.with_suffix(".json"), "its model card: preprocessing, class names, the run it came from")],
                  next_step=f"twist label {out} FOLDER --out labels.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("twist export", build_parser(), ExportConfig, argv, export_and_print)


if __name__ == "__main__":
    sys.exit(main())
