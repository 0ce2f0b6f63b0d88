"""Collections: listing and pairing sources, decoding images, the Zarr store, landing zones, incremental ingest."""
