"""The engine: pure tensors, no Lightning and nothing else from the package.

k-means++ and Lloyd (:mod:`.kmeans`), what a clustered tensor looks like to k-means
(:mod:`.layout`), the DKM step (:mod:`.numerics`, :mod:`.reference`, :mod:`.weighted` and its
two feeds :mod:`.chunked` and :mod:`.distinct`), the ``torch.nn.utils.parametrize`` module that
applies it to a weight (:mod:`.parametrization`), and the finalized form it produces
(:mod:`.palette`, :mod:`.bitpack`). Every layer above passes these types on.
"""
