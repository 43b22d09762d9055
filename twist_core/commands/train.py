"""``twist train DATA --out RUN``: train TWIST on an image folder (``twist_core.train.loop``).

Several processes: ``torchrun --nproc_per_node N -m twist_core.commands.train ...`` (or ``-m twist_core.train``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from twist_core.commands import run_command
from twist_core.config import command_parser
from twist_core.errors import UserError
from twist_core.layout import CONFIG_FILE
from twist_core.outputs import RUN, Output, check_outputs
from twist_core.train.allocator import keep_freed_memory
from twist_core.train.loop import __doc__ as DOC
from twist_core.train.loop import train
from twist_core.train.options import TrainConfig
from twist_core.train.summary import print_run_end


def build_parser() -> argparse.ArgumentParser:
    return command_parser("twist train", DOC, TrainConfig, positional=("data",))


def resumed_data(config: TrainConfig) -> TrainConfig:
    """``--resume`` without DATA: the folder the run was started on, from its config.json."""
    if config.data or not config.resume:
        return config
    saved_config = Path(config.out) / CONFIG_FILE
    if not saved_config.is_file():
        raise UserError(f"--resume found no run in {config.out} (no config.json): give --out of an existing run, "
                        "or the image folder (DATA) to start one")
    return dataclasses.replace(config, data=json.loads(saved_config.read_text())["data"])


def train_run(config: TrainConfig) -> int:
    if not config.data and not config.resume:
        raise UserError("give the image folder (DATA)")
    config = resumed_data(config)
    check_outputs([Output("--out", config.out, RUN)], within=[config.data, config.eval_data])
    train(config)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one process speaks
        print_run_end(Path(config.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    return run_command("twist train", build_parser(), TrainConfig, argv, train_run)


if __name__ == "__main__":
    sys.exit(main())
