"""data layer (see README, Architecture)."""
