"""The local stack: embedded PostgreSQL and Redis, and process groups stopped as a whole."""
