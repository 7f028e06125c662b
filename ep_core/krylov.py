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


def arnoldi_step(operator: Callable[[State], State], basis: list[torch.Tensor],
                 like: State) -> tuple[torch.Tensor, torch.Tensor]:
    """One Arnoldi step: extend the orthonormal Krylov basis q₀..q_j by one application of A.

    The qᵢ are flat vectors; ``like`` gives the state's shapes, since A acts on states. Returns (h, w) with
    w = A q_j − Σᵢ hᵢ qᵢ, the hᵢ taken by modified Gram–Schmidt, and h_{j+1} = ||w||: h is column j of the
    Hessenberg matrix H̄ (A Q_j = Q_{j+1} H̄_j) and q_{j+1} = w / h_{j+1}.
    """
    w = _flatten(operator(_unflatten(basis[-1], like)))
    h = torch.zeros(len(basis) + 1, dtype=w.dtype, device=w.device)
    for i, q in enumerate(basis):
        h[i] = torch.dot(w, q)
        w = w - h[i] * q
    h[-1] = torch.linalg.vector_norm(w)
    return h, w


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
        hessenberg[: j + 2, j], w = arnoldi_step(operator, basis, rhs)
        h = hessenberg[: j + 2, : j + 1]
        # 'gels' (QR) is deterministic; the CPU default 'gelsy' differs in the last bits between identical calls.
        coefficients = torch.linalg.lstsq(h, target[: j + 2, None], driver="gels").solution[:, 0]
        residual = torch.linalg.vector_norm(h @ coefficients - target[: j + 2])
        if residual <= tol * b_norm or hessenberg[j + 1, j] <= torch.finfo(b.dtype).eps * b_norm:
            break
        basis.append(w / hessenberg[j + 1, j])
    solution = torch.stack(basis[: coefficients.numel()], dim=1) @ coefficients
    return _unflatten(solution, rhs), coefficients.numel()
