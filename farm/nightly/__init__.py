"""The nightly: re-measure what went stale, diff against the shipped tables, report regressions and flips.

May import: `farm.sweep` and below.
"""
