"""evlgen: frozen vision tower + frozen causal LLM joined by a token-merging TomeFormer connector."""

__version__ = "0.1.0"


def load(path_or_repo: str, *, revision: str | None = None, **hub: object) -> "VLM":  # noqa: F821
    """Load a model saved with `save_pretrained`, from a folder or a Hugging Face repo id.

    A repo id ('owner/name') is fetched with huggingface_hub (or read from its cache when offline);
    `revision` pins a hub commit, and `hub` goes to `snapshot_download` (cache_dir, token, ...).
    """
    from evlgen.hub import load as _load

    return _load(path_or_repo, revision=revision, **hub)
