"""The syntax layer: lme4/glmmTMB formulas (with formulaic for expressions) and Stata commands, each read into a ModelSpec.

See README, "Architecture": each layer imports only the layers below it (tests/test_layers.py)."""
