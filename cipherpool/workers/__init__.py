"""Worker-side runtime: the platform context, pool-node state, query execution, signals."""
