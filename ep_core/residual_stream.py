"""Diagnostics of a residual network's stream, as seed 004's ``diagnose`` prints them, and when they make a
comparison with the exact gradient meaningless.

On a batch, with h_0 = embed(x), h_{l+1} = h_l + f_l(h_l) and L = cross-entropy(readout(h_L), y):

    ‖h_L‖         median over the samples of the last hidden state's norm
    ‖∂L/∂h_k‖     median over the samples of the exact gradient at h_k (k = 2, or L when L < 2): how much
                  learning signal backprop would send into the middle of the network
    growth        per block, the median of ‖h_{l+1}‖ / ‖h_l‖; its largest value
    accuracy      of the logits on this batch

Training a residual network with a rule that does not constrain the branches (DFA without its penalty) can make
the stream explode: ‖h_L‖ grows by orders of magnitude and the LayerNorm read-out flattens the gradient at h_k
towards zero. A cosine to a reference gradient that has collapsed, or taken where the stream has exploded, says
nothing about the rule, so :func:`meaningless` names those conditions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ep_core.protocols import Batch, ResidualModel

PROBE_LAYER = 2
GRADIENT_FLOOR = 1e-7
"""A reference gradient (all parameters) below this norm has collapsed: its direction is numerical noise."""
GROWTH_CEILING = 50.0
"""A block that multiplies the stream's norm by more than this has exploded it."""


def residual_stream(model: ResidualModel, batch: Batch) -> dict[str, Any]:
    """The diagnostics of the module docstring, as JSON-ready numbers."""
    probe = min(PROBE_LAYER, len(model.branches()))
    with torch.enable_grad():
        hidden = [model.embed(batch["inputs"]).detach().requires_grad_()]
        for block in model.branches():
            hidden.append(hidden[-1] + block(hidden[-1]))
        logits = model.readout(hidden[-1])
        gradient = torch.autograd.grad(F.cross_entropy(logits, batch["labels"]), hidden[probe])[0]
    with torch.no_grad():
        norms = [h.detach().norm(dim=-1) for h in hidden]
        growth = [float((after / before.clamp_min(torch.finfo(before.dtype).tiny)).median())
                  for before, after in zip(norms, norms[1:])]
        return {
            "h_L_norm": float(norms[-1].median()),
            "probe_layer": probe,
            "grad_norm": float(gradient.norm(dim=-1).median()),
            "growth": growth,
            "max_growth": max(growth),
            "accuracy": float((logits.argmax(dim=-1) == batch["labels"]).to(torch.float64).mean()),
        }


def meaningless(stream: dict[str, Any], reference_norm: float) -> list[str]:
    """Why cosines to the reference mean nothing here (empty when they do)."""
    reasons = []
    if reference_norm < GRADIENT_FLOOR:
        reasons.append(f"the reference gradient has collapsed (norm {reference_norm:.1e} < {GRADIENT_FLOOR:g})")
    if stream["max_growth"] > GROWTH_CEILING:
        reasons.append(f"the residual stream has exploded (a block multiplies ‖h‖ by {stream['max_growth']:.0f} > "
                       f"{GROWTH_CEILING:g}; median ‖h_L‖ {stream['h_L_norm']:.1e})")
    return reasons
