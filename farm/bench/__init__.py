"""Benchmarks that print ratios measured side by side in one run: ops, a model block, the roofline.

May import: `farm.sweep` (specs) and below; nothing imports it but `farm.cli`.
"""
