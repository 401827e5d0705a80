"""The Outlast service's insides: store, engine, webhooks, HTTP API, operations, CLI."""
