"""``twist restore-state SET_ASIDE.json --index INDEX``: apply set-aside curation again
(``twist_core.curate.restore``)."""

from __future__ import annotations

import argparse
import sys

from twist_core.commands import run_command
from twist_core.config import command_parser
from twist_core.curate.restore import RestoreConfig, restore_state
from twist_core.curate.restore import __doc__ as DOC
from twist_core.report import print_written


def build_parser() -> argparse.ArgumentParser:
    return command_parser("twist restore-state", DOC, RestoreConfig, positional=("file",))


def restore_and_print(config: RestoreConfig) -> int:
    restored = restore_state(config)
    print(f"restored {restored.saved.describe() or 'nothing'} from {config.file} into {restored.store}")
    if restored.set_aside:
        print(f"the curation it held before is set aside in {restored.set_aside} (twist restore-state "
              f"{restored.set_aside} --index {config.index} brings it back)")
    print_written([(restored.store, "the app's curation store, now holding the restored curation"),
                   *([(restored.set_aside, "the curation the store held before")] if restored.set_aside else [])])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("twist restore-state", build_parser(), RestoreConfig, argv, restore_and_print)


if __name__ == "__main__":
    sys.exit(main())
