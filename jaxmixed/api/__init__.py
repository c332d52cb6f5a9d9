"""The api layer: the public drivers that chain parse → design → engine → optimiser → tables → FitResult (fit, fit_spec, xtmixed, mixed, fit_many).

See README, "Architecture": each layer imports only the layers below it (tests/test_layers.py)."""
