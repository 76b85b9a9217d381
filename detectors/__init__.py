"""Detectors: pure functions of an event frame and `now` that return alerts."""
