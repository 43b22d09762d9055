"""Label whole folders with an exported model, the labels table, the review score.

``python -m twist_core.label`` (and ``torchrun -m twist_core.label``) runs ``twist label``."""
