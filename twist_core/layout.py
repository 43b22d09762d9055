"""The names of the files the stages write, in one place, so that every reader finds a run's checkpoint, an
index's metadata or the app's curation store by the same name (no module imports heavy code to learn one).
"""

# A run folder: twist train and twist finetune write it; eval, export, finetune and --resume read it.
CHECKPOINT_FILE = "last.pt"
CONFIG_FILE = "config.json"  # every resolved option: twist train --config repeats the run
METRICS_FILE = "metrics.jsonl"
SKIPPED_FILE = "skipped.txt"
CURVES_FILE = "curves.png"
DONE_FILE = "DONE"  # the final epoch's metrics: the run is complete
SUMMARY_FILE = "summary.json"
CLASS_NAMES_FILE = "class_names.txt"  # twist finetune's cluster names, which twist export copies into the card
FINETUNE_REPORT_FILE = "finetune.json"
FINETUNE_PLAN_FILE = "finetune-plan.json"  # what a fine-tune learns from, written before it starts
RUN_MARKERS = (CHECKPOINT_FILE, METRICS_FILE)  # with CONFIG_FILE: this folder holds a run
RUN_FILES = frozenset({CONFIG_FILE, *RUN_MARKERS, CURVES_FILE, SKIPPED_FILE, DONE_FILE, SUMMARY_FILE, CLASS_NAMES_FILE,
                       FINETUNE_REPORT_FILE, FINETUNE_PLAN_FILE})

# An index folder: MANIFEST names the current generation folder, which holds INDEX_FILE and META_FILE.
MANIFEST = "manifest.json"
FOLDER_LABELS_FILE = "labels.csv"  # the labels table twist index writes when it labels an image folder itself
INDEX_FILE = "index.faiss"
META_FILE = "meta.sqlite"
INFO_TABLE = "info"  # the metadata's key -> JSON value table: root, model, dim, kind, uid, generation, ...

# The app's state folder (the index folder unless --state-dir): the person's decisions.
CURATION_FILE = "curation.sqlite"
