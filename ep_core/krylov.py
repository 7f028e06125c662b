"""GMRES on states (tuples of tensors), for adjoint systems (I − J_Gᵀ)a = g given only u ↦ (I − J_Gᵀ)u.

Unlike the Neumann series it converges when the spectral radius of J_G is near or above 1 (as long as I − J_G
is invertible), at the price of storing one state-sized Krylov vector per iteration.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ep_core.protocols import State


def _flatten(state: State) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in state])


def _unflatten(vector: torch.Tensor, like: State) -> State:
    parts, offset = [], 0
    for t in like:
        parts.append(vector[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return tuple(parts)


def gmres(operator: Callable[[State], State], rhs: State, *, max_iter: int, tol: float) -> tuple[State, int]:
    """Solve operator(a) = rhs from a = 0; returns (a, operator applications). Stops at ||residual|| ≤ tol·||rhs||."""
    b = _flatten(rhs)
    b_norm = torch.linalg.vector_norm(b)
    if b_norm == 0:
        return tuple(torch.zeros_like(t) for t in rhs), 0
    basis = [b / b_norm]
    hessenberg = torch.zeros(max_iter + 1, max_iter, dtype=b.dtype, device=b.device)
    target = torch.zeros(max_iter + 1, dtype=b.dtype, device=b.device)
    target[0] = b_norm
    coefficients = torch.zeros(0, dtype=b.dtype, device=b.device)
    for j in range(max_iter):
        w = _flatten(operator(_unflatten(basis[j], rhs)))
        for i, v in enumerate(basis):  # modified Gram–Schmidt
            hessenberg[i, j] = torch.dot(w, v)
            w = w - hessenberg[i, j] * v
        hessenberg[j + 1, j] = torch.linalg.vector_norm(w)
        h = hessenberg[: j + 2, : j + 1]
        coefficients = torch.linalg.lstsq(h, target[: j + 2, None]).solution[:, 0]
        residual = torch.linalg.vector_norm(h @ coefficients - target[: j + 2])
        if residual <= tol * b_norm or hessenberg[j + 1, j] <= torch.finfo(b.dtype).eps * b_norm:
            break
        basis.append(w / hessenberg[j + 1, j])
    solution = torch.stack(basis[: coefficients.numel()], dim=1) @ coefficients
    return _unflatten(solution, rhs), coefficients.numel()
