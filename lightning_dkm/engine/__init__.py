"""The engine: pure tensors, no Lightning and nothing else from the package.

k-means++ and Lloyd (:mod:`.kmeans`), what a clustered tensor looks like to k-means
(:mod:`.layout`), the one weighted DKM core (:mod:`.weighted`) and what feeds it: the exact
weights (:mod:`.chunked`) or their distinct float16 values with counts (:mod:`.distinct`,
:mod:`.float16_codes`), for one tensor or a whole model's in one batched call
(:mod:`.clustering_pass`); the shared numerics (:mod:`.numerics`), the plain-autograd oracle
(:mod:`.reference`), the ``torch.nn.utils.parametrize`` module that applies DKM to a weight
(:mod:`.parametrization`), and the finalized form it produces (:mod:`.palette`,
:mod:`.bitpack`). Every layer above passes these types on.
"""
