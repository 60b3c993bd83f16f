"""Turn stored measurement rows into per-ISA autotune tables; diff tables; the `farm table`/`aggregate` commands.

May import: `farm.measure` and below (pure functions over rows; no Ray).
"""
