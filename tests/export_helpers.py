"""What the tests of the artifact format share: the file's digest, computed from the format's
definition, so a test can edit a file and still reach the checks behind the digest."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

DIGEST_KEY = "lightning_dkm.sha256"


def artifact_digest(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """``lightning_dkm.sha256`` of a file with ``metadata`` and ``tensors``: SHA-256 over every
    metadata entry but the digest (``meta\\0<key>\\0<value>\\0``) and every tensor
    (``tensor\\0<name>\\0<dtype>\\0<shape>\\0`` and its bytes), each in sorted order."""
    h = hashlib.sha256()
    for key in sorted(metadata):
        if key != DIGEST_KEY:
            h.update(f"meta\0{key}\0{metadata[key]}\0".encode())
    for key in sorted(tensors):
        t = tensors[key]
        dtype = str(t.dtype).removeprefix("torch.")
        h.update(f"tensor\0{key}\0{dtype}\0{list(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
