"""The app layer: the command line and the seed talk's tour.

See README, "Architecture": each layer imports only the layers below it (tests/test_layers.py)."""
