"""app layer (see README, Architecture)."""
