"""Notebook views: live training metrics, the ranking panel, the compare panel (with text fallbacks)."""
