"""evlgen: frozen vision tower + frozen causal LLM joined by a token-merging TomeFormer connector."""

__version__ = "0.1.0"


def load(path: str) -> "VLM":  # noqa: F821
    """Load a model saved with `save_pretrained` (trainable weights + config naming the frozen parts)."""
    from evlgen.model.build import from_pretrained

    return from_pretrained(path)
