"""Procedurally generated data sets."""
