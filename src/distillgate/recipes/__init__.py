"""Recipes: one file per flow, reading top to bottom (setup -> work -> cleanup)."""
