"""The durable store: PostgreSQL, its transactions, and the one writer of task status."""
