"""TWIST unsupervised image clustering: data -> model -> train -> deploy (ONNX) -> label -> index -> curate."""

import os

# OpenMP threads that spin while waiting make PyTorch 10-50x slower on a small machine whose cores are shared
# with anything else (decoding workers, a second process, a browser). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
