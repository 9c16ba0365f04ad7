"""Prices and cost arithmetic (pure), and settlement of a request's bill into storage."""
