"""Implementations of one Gefen step."""
