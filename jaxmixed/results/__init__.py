"""The results layer: FitResult and ManyResult, prediction and BLUPs, estat, the Stata-style report, tidy tables and markup, plots.

See README, "Architecture": each layer imports only the layers below it (tests/test_layers.py)."""
