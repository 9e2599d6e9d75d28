"""Ray Train and Ray Tune entrypoints over the pure-PyTorch ``mve`` library.

Thin adapters: ``mve`` owns the model, data and training loop; this package owns Ray.
"""
