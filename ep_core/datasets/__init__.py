"""The datasets epx registers, one module each, sharing one store.

    store          search path, user cache, download (size cap, SHA-256, atomic move), DataNotFound, and the
                   fallback from real data to the generated sample
    images         ImageDataset (batches, augmentation, normalisation), IDX files, the generated images
    text           TextDataset, the token cache, the generated play
    fashionmnist   Fashion-MNIST            (images)
    cifar10        CIFAR-10, binary version (images)
    shakespeare    tiny Shakespeare         (text)
    sample         the generated data, in the kind and shape the model asks for
    auto           the default choice: not a dataset, resolved by ep_core.session.load_data

Imports only go down that list's dependency order (store ← images, text ← the datasets ← sample), so none is
cyclic. Every registered factory is called as ``factory(*, data_dir, download, warn, split, kind, shape)``.
This package module imports nothing heavy: listing what is registered must not load torch.
"""

#: The data choice that tries a model's own datasets (``DataSpec.datasets``) and falls back to SAMPLE.
AUTO = "auto"

#: The generated dataset, of any kind and shape, that needs no files and no network.
SAMPLE = "sample"
