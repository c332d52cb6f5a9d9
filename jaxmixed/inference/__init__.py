"""The inference layer: fixed-effects and variance-component tables in Stata's metric, Wald and likelihood-ratio tests, the parametric bootstrap, the distributions they need.

See README, "Architecture": each layer imports only the layers below it (tests/test_layers.py)."""
