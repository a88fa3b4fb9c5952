"""A model's view of clustering: which tensors (:mod:`.targets`, :mod:`.tied`), attach and
finalize (:mod:`.attach`), post-training k-means (:mod:`.post_training`), the train-time
methods (:mod:`.methods`), the palettes a finalized model carries (:mod:`.carried`), the
tensors of its state (:mod:`.state`), the plain checkpoint format (:mod:`.checkpoint`) and
state dicts with DKM keys loaded snapped (:mod:`.snapping`). Uses the
engine; no Lightning.
"""
