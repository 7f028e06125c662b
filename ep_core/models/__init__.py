"""Reference models. Each is one readable file with a dataclass config."""
