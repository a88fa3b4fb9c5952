"""The Lightning layer: :class:`~lightning_dkm.DKMCallback` (lifecycle glue), its temperature
schedules (:mod:`.schedules`, :mod:`.temperature`), the torchmetrics metrics and how they are
measured (:mod:`.metrics`, :mod:`.convergence`) and the ddp_spawn handoff (:mod:`.handoff`).
The only layer that imports Lightning.
"""
