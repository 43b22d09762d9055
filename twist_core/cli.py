"""``twist COMMAND ...``: a thin dispatcher; each command parses its own config dataclass and calls one function."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("twist_core.commands.demo",
             "the whole pipeline on scikit-learn's digits, then the app (no arguments needed)"),
    "train": ("twist_core.commands.train", "train TWIST on an image folder"),
    "finetune": ("twist_core.commands.finetune",
                 "continue training a run with the labels a person set or confirmed in the app"),
    "eval": ("twist_core.commands.eval", "score clusters against class folders (ACC/NMI/AMI/ARI, kNN, baselines)"),
    "export": ("twist_core.commands.export", "export a run to one ONNX file with its model card"),
    "label": ("twist_core.commands.label", "label every image of a folder with an exported model"),
    "index": ("twist_core.commands.index", "build or update a FAISS similarity index from labels + embeddings"),
    "search": ("twist_core.commands.search", "find the images most similar to an image (or an indexed id)"),
    "duplicates": ("twist_core.commands.duplicates", "list groups of near-identical images in an index"),
    "suggest-merges": ("twist_core.commands.suggest_merges",
                       "rank cluster pairs to merge (over-clustered runs) and estimate K"),
    "app": ("app.main", "open the web app: browse, search, curate and export the clusters"),
    "import-labels": ("app.labelstudio", "apply the labels chosen in Label Studio (its JSON export) to the app"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: twist COMMAND [options]   (twist COMMAND --help for each)\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
