"""The engine layer: linear-algebra kernels and the likelihood engines behind one interface (engine/interface.py): penalised least squares from cross-products (dense and blocked-sparse layouts), marginal GLS per panel for residual structures.

See README, "Architecture": each layer imports only the layers below it (tests/test_layers.py)."""
