"""Streaming generation for `int8 generate` (filled in below)."""
