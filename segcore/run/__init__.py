"""A segmentation run: the plan, the run directory, work units and blocks, evaluation, tables, the reader."""
