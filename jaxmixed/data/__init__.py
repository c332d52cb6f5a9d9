"""The data layer: the design (schema and rows; missing rows dropped), the sparsity pattern of ZᵀZ, the cross-products, the shipped data sets.

See README, "Architecture": each layer imports only the layers below it (tests/test_layers.py)."""
