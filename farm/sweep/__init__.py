"""A sweep: spec -> Ray tasks per (problem, ISA class) -> store -> tables.

May import: `farm.tables`, `farm.cluster`, `farm.measure` and below.
"""
