"""What ep_core registers itself, through the same hooks a plugin uses: the bptt reference, the reference
models and the datasets."""

from __future__ import annotations

from ep_core.bptt import BPTT
from ep_core.data import register_builtin_datasets
from ep_core.models.cet import CET
from ep_core.models.lm import LM
from ep_core.models.toy import Toy
from ep_core.plugins import hookimpl


@hookimpl
def register_estimators(register):
    register("bptt", BPTT)


@hookimpl
def register_models(register):
    register("cet", CET)
    register("lm", LM)
    register("toy", Toy)


@hookimpl
def register_datasets(register):
    register_builtin_datasets(register)
