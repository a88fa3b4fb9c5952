"""The Lightning layer: :class:`~lightning_dkm.DKMCallback` (lifecycle glue, :mod:`.callback`)
and the modules it uses, one job each (listed with their jobs in ``docs/architecture.md``). The
only layer that imports Lightning.
"""
