"""inference layer (see README, Architecture)."""
