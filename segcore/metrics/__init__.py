"""Metrics: Dice from confusion counts, instance matching and AP, run summaries, and per-volume
metrics in physical units (Dice, IoU, HD95, ASSD; :mod:`segcore.metrics.surface`)."""
