"""syntax layer (see README, Architecture)."""
