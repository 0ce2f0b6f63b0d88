"""Training: the semantic and instance trainers."""
