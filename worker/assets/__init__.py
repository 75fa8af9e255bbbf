"""Offline assets: a synthetic instruction dataset and small models for tests and the demo."""
