"""Hub-compatible HTTP server for tests (being written)."""
