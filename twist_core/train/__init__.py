"""The TWIST loss, the training loop (one process or torchrun), the schedule, the photo defaults.

``python -m twist_core.train`` (and ``torchrun -m twist_core.train``) runs ``twist train``."""
