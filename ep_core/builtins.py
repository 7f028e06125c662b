"""What ep_core registers itself, through the same hooks a plugin uses: the bptt reference, the reference
models and the datasets. Everything is registered by reference ("module:attribute"), so that listing what is
installed (`epx list`, `epx --help`) imports none of it, and not torch."""

from __future__ import annotations

from ep_core.plugins import hookimpl


@hookimpl
def register_estimators(register):
    register("bptt", "ep_core.bptt:BPTT",
             summary="the exact reference: backprop of the model's loss (through the T1 free-phase steps of an "
                     "equilibrium model)")
    register("backprop", "ep_core.bptt:Backprop",
             summary="the exact reference under the name of feed-forward work: the same as bptt")


@hookimpl
def register_models(register):
    register("cet", "ep_core.models.cet:CET",
             summary="energy transformer for masked patch reconstruction; attention scale s")
    register("lm", "ep_core.models.lm:LM",
             summary="causal equilibrium attention on characters (next-character cross-entropy); scale s")
    register("toy", "ep_core.models.toy:Toy",
             summary="tiny Hopfield network, conservative=True|False, for property tests")
    register("resmlp", "ep_core.models.resmlp:ResMLP",
             summary="residual MLP classifier (embed, L blocks LN→Linear→GELU→Linear, norm, head); seed 004's model")
    register("localgpt", "ep_core.models.localgpt:LocalGPT",
             summary="nanoGPT-shaped character GPT of local layers (attn=softmax|sigmoid); seed 003's model")


@hookimpl
def register_datasets(register):
    """Each factory is called as ``factory(*, data_dir, download, warn, split, kind, shape)``: ``kind`` and ``shape``
    are what the model asks for (``DataSpec.kind`` and ``sample_shape``); real datasets return their own."""
    from ep_core.datasets import AUTO, SAMPLE  # the names ep_core.session.load_data resolves 'auto' with

    register("fashionmnist", "ep_core.datasets.fashionmnist:dataset",
             summary="Fashion-MNIST (Zalando), 1x28x28, 10 classes; local files or download, SHA-256 checked")
    register("cifar10", "ep_core.datasets.cifar10:dataset",
             summary="CIFAR-10, binary version, 3x32x32, 10 classes, seed 004's normalisation; local tarball or "
                     "download, SHA-256 checked")
    register("shakespeare", "ep_core.datasets.shakespeare:dataset",
             summary="tiny Shakespeare (char-rnn), 1.1M characters, 65-character vocabulary; local file or "
                     "download, SHA-256 checked")
    register(SAMPLE, "ep_core.datasets.sample:dataset",
             summary="generated: shapes (bars, rings, discs, ...), 10 classes, in the model's image shape (1x28x28 "
                     "by default), or for text models a small play; deterministic, offline")
    register(AUTO, "ep_core.datasets.auto:dataset",
             summary="the default: the model's own datasets in order (DataSpec.datasets), the first that is found "
                     "or downloaded, else the generated sample with a warning")
