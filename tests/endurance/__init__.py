"""Endurance under faults: see tests/endurance/run.py."""
