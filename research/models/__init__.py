"""Whole models built from research.nn blocks."""
