"""TWIST unsupervised image clustering: folder -> dataset -> augment -> model -> loss -> train -> export -> label."""

__version__ = "0.1.0"
