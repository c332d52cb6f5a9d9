"""The fit layer: optimisers, starts and the restart search, one fit of any engine as one compiled program, batched fits of many responses.

See README, "Architecture": each layer imports only the layers below it (tests/test_layers.py)."""
