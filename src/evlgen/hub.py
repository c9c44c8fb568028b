"""Sharing checkpoints: the generated model card, `push_to_hub`, and `load` from a folder or a hub repo.

A checkpoint folder (see `evlgen.model.build.write_checkpoint`) is self-describing: `model.safetensors`
(the trainable weights), `config.yaml` (naming the frozen parts by hub id or by a folder inside the
checkpoint) and `README.md`, a model card generated from the config. The folder is what goes to the
Hugging Face Hub, unchanged except for the card's usage lines naming the repo.

huggingface_hub is imported only when a hub repo is read or written, and never downloads anything
when `HF_HUB_OFFLINE=1` (then a repo id is served from the local hub cache or fails with a clear
message).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evlgen.config import Config

if TYPE_CHECKING:
    from evlgen.model.vlm import VLM

# The card's usage examples name this placeholder; push_to_hub replaces it with the repo id.
CARD_PLACEHOLDER = "path/to/this/model"
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
_ANY_REPO_ID = re.compile(rf"^({_NAME}/)?{_NAME}$")  # legacy ids have no owner: bert-base-uncased

CITATION = """@inproceedings{jian2024evlgen,
  title     = {Expedited Training of Visual Conditioned Language Generation via Redundancy Reduction},
  author    = {Jian, Yiren and others},
  booktitle = {Proceedings of ACL},
  year      = {2024}
}"""


def is_repo_id(name: str) -> bool:
    """'owner/name' (or a legacy 'name') with hub-legal characters; an existing local path is never one."""
    return bool(_ANY_REPO_ID.match(name)) and not Path(name).exists()


def _source(name_or_path: str | None, revision: str | None) -> str:
    if name_or_path is None:
        return "random weights"
    if name_or_path.startswith("./"):
        return f"stored in this checkpoint (`{name_or_path}`)"
    return f"`{name_or_path}`" + (f" (revision `{revision}`)" if revision else "")


def model_card(cfg: Config, state: dict[str, torch.Tensor], notes: Sequence[str] = ()) -> str:
    """A Hugging Face model card (README.md with YAML front matter) describing a checkpoint."""
    from evlgen.model.build import plan

    p = plan(cfg)
    c = cfg.connector
    trainable = sum(t.numel() for t in state.values())
    hub_parts = [
        s for s in (cfg.vision.name_or_path, cfg.llm.name_or_path, c.init) if s is not None and is_repo_id(s)
    ]
    front = [
        "---",
        "library_name: evlgen",
        "pipeline_tag: image-to-text",
        "tags: [evlgen, image-captioning, visual-question-answering, token-merging, tomeformer]",
    ]
    if hub_parts:
        front.append("base_model: [" + ", ".join(hub_parts) + "]")
    front.append("---")
    sched = " → ".join(map(str, [p.token_schedule[0], p.token_schedule[-1]]))
    rs = c.r if isinstance(c.r, int) else list(c.r)
    g, q = cfg.caption, cfg.vqa
    lines = [
        *front,
        "",
        f"# {cfg.name} (evlgen)",
        "",
        "A visually conditioned language generation model trained the EVLGen way: a frozen vision tower and "
        "a frozen causal LM joined by a trainable TomeFormer connector that merges similar visual tokens "
        f"layer by layer. This folder holds the {trainable:,} trainable parameters (`model.safetensors`: "
        "`ln_vision`, the two projections and the connector) and `config.yaml`; the frozen parts are "
        "rebuilt from their sources when the model is loaded.",
        "",
        "| part | source | trained |",
        "| --- | --- | --- |",
        f"| vision tower ({cfg.vision.family}, block {cfg.vision.layer}, "
        f"{cfg.vision.arch.get('image_size')} px) | {_source(cfg.vision.name_or_path, cfg.vision.revision)} "
        "| no (frozen) |",
        f"| TomeFormer connector ({c.arch.num_hidden_layers} layers, hidden {c.arch.hidden_size}, "
        f"r={rs}, {c.merge_mode} merge; {sched} visual tokens) | initialised from "
        f"{_source(c.init, c.revision)} | yes |",
        f"| language model ({cfg.llm.arch.get('model_type', '?')}) | "
        f"{_source(cfg.llm.name_or_path, cfg.llm.revision)} | no (frozen) |",
        "",
        "## Use",
        "",
        "```python",
        "import evlgen",
        "",
        f'model = evlgen.load("{CARD_PLACEHOLDER}")  # a folder or a Hugging Face repo id',
        'model.caption(["photo.jpg", "clip.mp4"])',
        'model.answer(["photo.jpg"], ["what colour is the car?"])',
        "```",
        "",
        "```bash",
        f"evlgen caption --checkpoint {CARD_PLACEHOLDER} photo.jpg",
        f"evlgen serve --checkpoint {CARD_PLACEHOLDER}   # web demo on http://127.0.0.1:7860",
        "```",
        "",
        f"Captioning: prompt {g.prompt!r}, beam {g.num_beams}, {g.min_new_tokens}-{g.max_new_tokens} new "
        f"tokens. Questions: prompt {q.prompt!r}, beam {q.num_beams}, at most {q.max_new_tokens} new "
        "tokens. Inputs are resized to the tower's size with its own mean and std; videos are "
        f"{cfg.data.frames} uniformly sampled frames averaged after the tower.",
        "",
        "The frozen parts keep their own licences and limitations: read their model cards before use.",
    ]
    if notes:
        lines += ["", "## Provenance", "", *[f"- {n}" for n in notes]]
    lines += [
        "",
        "## Method",
        "",
        "Jian et al., *Expedited Training of Visual Conditioned Language Generation via Redundancy "
        "Reduction*, ACL 2024 (arXiv 2310.03291).",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


class HubError(RuntimeError):
    """The hub could not be used (offline, no such repo, not logged in, ...), with what to do about it."""


def _portable(cfg: Config) -> list[str]:
    # A frozen part named by a local path only exists on this machine: the pushed model could not load.
    problems = []
    for where, value in (
        ("vision.name_or_path", cfg.vision.name_or_path),
        ("llm.name_or_path", cfg.llm.name_or_path),
        ("llm.tokenizer", cfg.llm.tokenizer),
    ):
        if value is None or value.startswith("./") or value == "byte" or is_repo_id(value):
            continue
        problems.append(f"{where} = {value!r} is a local path")
    return problems


def push_to_hub(
    directory: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload evlgen model",
) -> str:
    """Upload a checkpoint folder to a Hugging Face model repo (created if missing); returns its URL.

    Refuses a checkpoint whose frozen parts are local paths (nobody else could load it); save it with
    those parts embedded (a part with no hub source is), or point them at hub ids.
    """
    from evlgen.model.build import CARD_FILE, WEIGHTS_FILE, read_config

    directory = Path(directory)
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"repo id must look like 'owner/name', got {repo_id!r}")
    problems = _portable(read_config(directory))
    if not (directory / WEIGHTS_FILE).is_file():
        problems.append(f"{WEIGHTS_FILE} is missing")
    if problems:
        raise HubError(
            "this checkpoint cannot be loaded elsewhere: "
            + "; ".join(problems)
            + ". Use hub ids for the frozen parts, or re-save the model with those parts embedded."
        )
    try:
        from huggingface_hub import CommitOperationAdd, HfApi
    except ImportError as e:  # pragma: no cover - transformers depends on huggingface_hub
        raise HubError("pushing needs huggingface_hub: pip install huggingface_hub") from e
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise HubError("HF_HUB_OFFLINE is set: unset it (and log in with `hf auth login`) to push")
    operations = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == CARD_FILE:
            text = path.read_text().replace(CARD_PLACEHOLDER, repo_id)
            operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=text.encode()))
        else:
            operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)))
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message,
            revision=revision,
            repo_type="model",
        )
    except Exception as e:
        raise HubError(f"pushing to {repo_id} failed: {type(e).__name__}: {e}") from e
    return str(getattr(url, "url", url))


def resolve(path_or_repo: str | os.PathLike[str], *, revision: str | None = None, **hub: Any) -> Path:
    """A local checkpoint folder for a folder path or a hub repo id (downloaded, or from the hub cache).

    `hub` goes to `huggingface_hub.snapshot_download` (cache_dir, token, local_files_only, ...).
    """
    path = Path(path_or_repo)
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} only applies to hub repos, but {path} is a local folder")
        return path
    name = str(path_or_repo)
    if not is_repo_id(name):
        raise FileNotFoundError(f"{name}: no such checkpoint folder (nor a hub repo id like 'owner/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, repo_type="model", **hub))
    except LocalEntryNotFoundError as e:
        raise HubError(
            f"{name} is not a local folder and not in the hub cache, and the hub cannot be reached "
            "(HF_HUB_OFFLINE=1 or no network): download it once with network access"
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise HubError(f"{name}: no such model repo or revision on the hub (or it is private)") from e


def load(path_or_repo: str | os.PathLike[str], *, revision: str | None = None, **hub: Any) -> VLM:
    """Load a saved model from a folder or a Hugging Face repo id (see `resolve`)."""
    from evlgen.model.build import from_pretrained

    return from_pretrained(resolve(path_or_repo, revision=revision, **hub))
