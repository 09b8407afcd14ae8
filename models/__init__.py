"""Model wrappers: load weights from a URI, run a batch of tensors. Nothing about items, queues or Parquet."""
