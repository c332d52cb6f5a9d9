"""fit layer (see README, Architecture)."""
