"""Measure one problem on this host: host profile, problem, protocol, isolated worker, timing, records, store.

May import: `kernels`, `farm.errors`, `farm.render`, and its own modules. Nothing above it.
"""
