"""The Lightning layer: :class:`~lightning_dkm.DKMCallback` (lifecycle glue, :mod:`.callback`)
and the modules it is cut into: argument checks (:mod:`.arguments`), setup-time Trainer checks
(:mod:`.preflight`), modes and tau per step (:mod:`.timeline`), the clustering pass per forward
(:mod:`.forward_cache`), checkpoints (:mod:`.checkpointing`) and outputs (:mod:`.outputs`);
temperature (:mod:`.schedules`, :mod:`.temperature`), the torchmetrics metrics and how they are
measured (:mod:`.metrics`, :mod:`.convergence`) and the ddp_spawn handoff (:mod:`.handoff`).
The only layer that imports Lightning.
"""
