"""The plugins the entry points of epx's own estimators name, one per method: each registers its class by
reference, so that `epx list` imports neither the method nor torch. (They live here, not in the package's
``__init__``, because importing ``epx_estimators.aep`` sets the package attribute ``aep`` to that module.)"""

from ep_core.plugins import registers

ep = registers("estimator", "ep", "epx_estimators.ep:EP",
               summary="equilibrium propagation: contrast of ±β nudged phases")
aep = registers("estimator", "aep", "epx_estimators.aep:AEP",
                summary="asymmetric EP: nudged phases corrected by −(Jv − Jᵀv), exact without symmetry")
adjoint = registers("estimator", "adjoint", "epx_estimators.adjoint:Adjoint",
                    summary="projected implicit differentiation: a = J_Gᵀa + g at the fixed point")
dfa = registers("estimator", "dfa", "epx_estimators.dfa:DFA",
                summary="direct feedback alignment with a residual-branch penalty λ: random projections of the "
                        "output error train each block")
fa = registers("estimator", "fa", "epx_estimators.fa:FA",
               summary="feedback alignment (mode=random|sign|transpose) with LayerNorm surrogate backward passes "
                       "(ln=exact|center_scale|projected|identity)")
