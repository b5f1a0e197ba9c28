"""Gram-Schmidt initialisation of new prompt components against the ones earlier tasks trained."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def orthonormal_extension(previous: torch.Tensor, n_new: int) -> torch.Tensor:
    """Return `n_new` random unit rows orthogonal to each other and to the span of `previous` (rows).

    Rows are flattened, so 3-d prompt tensors (components x length x dim) work too. When the space is too
    small to hold all components orthogonally (demo backbones: 100 CODA keys in 64 dims), the new rows stay
    orthonormal among themselves and orthogonal to as many of the most recent previous rows as fit.
    """
    shape = (n_new, *previous.shape[1:])
    dim = previous[0].numel() if previous.shape[0] else int(torch.tensor(shape[1:]).prod())
    if n_new > dim:
        raise ValueError(f"cannot make {n_new} orthonormal components in {dim} dimensions; use fewer components")
    prev = previous.detach().reshape(previous.shape[0], dim).to(torch.float64)
    room = dim - n_new
    if prev.shape[0] > room:
        log.debug("only %d of %d earlier components fit orthogonally in %d dims", room, prev.shape[0], dim)
        prev = prev[prev.shape[0] - room :] if room else prev[:0]
    new = torch.randn(n_new, dim, dtype=torch.float64)
    if prev.shape[0]:
        basis, _ = torch.linalg.qr(prev.T)  # dim x r orthonormal basis of the earlier components
        new = new - (new @ basis) @ basis.T
        new = new - (new @ basis) @ basis.T  # second pass: classical GS loses orthogonality in float
    new_basis, _ = torch.linalg.qr(new.T)
    return new_basis.T.reshape(shape).to(previous.dtype)
