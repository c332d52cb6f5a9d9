"""The model layer: the description of a model without data (ModelSpec), covariance structures of the random effects (and the singularity test), residual structures.

See README, "Architecture": each layer imports only the layers below it (tests/test_layers.py)."""
