"""Metrics: Dice from confusion counts, instance matching and AP, run summaries."""
