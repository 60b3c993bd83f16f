"""Ray: labelled farm nodes, the local multi-node cluster, task dispatch by ISA label, job relay.

May import: `farm.measure` and below.
"""
