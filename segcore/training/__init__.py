"""Training: the shared loop (``loop``), the semantic and instance trainers, and training from a store."""
