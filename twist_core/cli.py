"""``twist COMMAND ...``: a thin dispatcher; each command parses its own config dataclass and calls one function.

The core lists its own commands. Other packages add theirs through the ``twist.commands`` entry-point group
(the app registers ``app`` and ``import-labels`` in pyproject.toml), so the core never imports them by name and
runs without them.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points

from twist_core.errors import terminal_safe

ENTRY_POINT_GROUP = "twist.commands"


@dataclass(frozen=True)
class Command:
    """A ``twist`` command: the module whose ``main(argv)`` runs it, and its line in ``twist --help``."""

    module: str
    help: str


CORE_COMMANDS = {
    "demo": Command("twist_core.commands.demo",
                    "the whole pipeline on scikit-learn's digits, then the app (no arguments needed)"),
    "train": Command("twist_core.commands.train", "train TWIST on an image folder"),
    "finetune": Command("twist_core.commands.finetune",
                        "continue training a run with the labels a person set or confirmed in the app"),
    "eval": Command("twist_core.commands.eval",
                    "score clusters against class folders (ACC/NMI/AMI/ARI, kNN, baselines)"),
    "export": Command("twist_core.commands.export", "export a run to one ONNX file with its model card"),
    "label": Command("twist_core.commands.label", "label every image of a folder with an exported model"),
    "merge-tables": Command("twist_core.commands.merge_tables",
                            "merge labels tables of shards labelled apart into one table for twist index"),
    "index": Command("twist_core.commands.index", "build or update a FAISS similarity index from labels + embeddings"),
    "search": Command("twist_core.commands.search", "find the images most similar to an image (or an indexed id)"),
    "duplicates": Command("twist_core.commands.duplicates", "list groups of near-identical images in an index"),
    "suggest-merges": Command("twist_core.commands.suggest_merges",
                              "rank cluster pairs to merge (over-clustered runs) and estimate K"),
    "restore-state": Command("twist_core.commands.restore_state",
                             "put back the curation set aside when the index's model changed (its JSON file)"),
}


def commands() -> dict[str, Command]:
    """The core's commands, then every registered one (a registered name cannot replace a core command)."""
    found = dict(CORE_COMMANDS)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            command = entry.load()
        except (Exception, SystemExit) as error:  # a plugin may raise (or exit) at import: the rest still runs
            detail = terminal_safe(" ".join(f"{type(error).__name__}: {error}".split()))
            print(f"twist: warning: command '{terminal_safe(entry.name)}' ({terminal_safe(entry.value)}) could "
                  f"not be loaded, skipped: {detail}", file=sys.stderr)
            continue
        if entry.name not in found and isinstance(command, Command):
            found[entry.name] = command
    return found


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    available = CORE_COMMANDS if argv and argv[0] in CORE_COMMANDS else commands()  # plugins only when needed
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in available:
        width = max(map(len, available))
        lines = [f"  {name:<{width}}  {command.help}" for name, command in available.items()]
        print("usage: twist COMMAND [options]   (twist COMMAND --help for each)\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(available[argv[0]].module).main(argv[1:])


if __name__ == "__main__":  # ``python -m twist_core.cli``: run the imported module, whose Command the plugins use
    from twist_core import cli

    sys.exit(cli.main())
