"""Benchmarks that print ratios and figures measured in one run (never typed by hand)."""
