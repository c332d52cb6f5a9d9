"""model layer (see README, Architecture)."""
