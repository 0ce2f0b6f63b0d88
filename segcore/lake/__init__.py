"""The data lake: publishing run tables, and reports over them."""
