"""results layer (see README, Architecture)."""
