"""Sharing: the generated model card, `evlgen.load` of a hub repo id (from a local hub cache, offline), and
`push_to_hub` against a stand-in for huggingface_hub's API (nothing touches the network)."""

import shutil

import huggingface_hub
import pytest
import torch
import yaml
from safetensors.torch import load_file

import evlgen
from evlgen.config import load_config
from evlgen.hub import CARD_PLACEHOLDER, HubError, model_card, push_to_hub
from evlgen.model.build import build_vlm, meta_vlm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    vlm = build_vlm(load_config("tiny"), log_table=False)
    path = tmp_path_factory.mktemp("hub") / "model"
    vlm.save_pretrained(path, card_notes=["trained on the synthetic world"])
    return vlm, path


def front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_save_pretrained_writes_a_model_card(saved):
    vlm, path = saved
    card = (path / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "evlgen" and meta["pipeline_tag"] == "image-to-text"
    assert "base_model" not in meta  # tiny's frozen parts are stored inside, not on the hub
    trainable = sum(t.numel() for t in load_file(path / "model.safetensors").values())
    assert f"{trainable:,} trainable parameters" in card
    assert "17 → 9 visual tokens" in card  # 17 tokens, two layers merging 4 each
    assert "stored in this checkpoint (`./vision`)" in card and "- trained on the synthetic world" in card
    assert f'evlgen.load("{CARD_PLACEHOLDER}")' in card


def test_card_names_hub_sources_as_base_models():
    cfg = load_config("paper-opt2.7b", ["vision.revision=abc123"])
    card = model_card(cfg, meta_vlm(cfg).trainable_state_dict())
    meta = front_matter(card)
    assert meta["base_model"] == ["Salesforce/blip2-opt-2.7b", "facebook/opt-2.7b", "bert-base-uncased"]
    assert "`Salesforce/blip2-opt-2.7b` (revision `abc123`)" in card
    assert "257 → 29 visual tokens" in card and "r=19" in card


def test_load_a_repo_id_from_the_hub_cache_offline(saved, tmp_path):
    vlm, path = saved
    # The layout huggingface_hub keeps for a downloaded repo: refs/main -> snapshots/<commit>/.
    repo = tmp_path / "cache" / "models--someone--tiny-evlgen"
    shutil.copytree(path, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    again = evlgen.load("someone/tiny-evlgen", cache_dir=tmp_path / "cache")
    for key, value in vlm.trainable_state_dict().items():
        assert torch.equal(again.trainable_state_dict()[key], value), key
    with pytest.raises(HubError, match="not in the hub cache"):
        evlgen.load("someone/absent", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        evlgen.load(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(FileNotFoundError, match="is not an evlgen checkpoint"):
        evlgen.load(tmp_path)
    with pytest.raises(ValueError, match="revision"):
        evlgen.load(path, revision="main")


class FakeApi:
    """Records what push_to_hub asks of huggingface_hub.HfApi."""

    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            data = op.path_or_fileobj
            files[op.path_in_repo] = data if isinstance(data, bytes) else open(data, "rb").read()
        self.calls.append(("create_commit", repo_id, files))


def test_push_to_hub_uploads_the_folder_with_the_card_naming_the_repo(saved, monkeypatch):
    vlm, path = saved
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    FakeApi.calls = []
    url = push_to_hub(path, "someone/tiny-evlgen", private=True)
    assert url == "https://huggingface.co/someone/tiny-evlgen"
    (_, _, repo_kwargs), (_, repo, files) = FakeApi.calls
    assert repo_kwargs["private"] is True and repo == "someone/tiny-evlgen"
    expected = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert set(files) == expected and {"vision/config.json", "llm/tokenizer.json"} <= expected
    assert files["model.safetensors"] == (path / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert 'evlgen.load("someone/tiny-evlgen")' in card and CARD_PLACEHOLDER not in card

    FakeApi.calls = []
    vlm.push_to_hub("someone/tiny-evlgen")
    assert set(FakeApi.calls[1][2]) == expected


def test_push_refuses_what_others_could_not_load(saved, tmp_path, monkeypatch):
    vlm, path = saved
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_to_hub(path, "someone/x")  # the test suite runs offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    local = tmp_path / "local"
    shutil.copytree(path, local)
    text = (local / "config.yaml").read_text().replace("name_or_path: ./llm", f"name_or_path: {path / 'llm'}")
    (local / "config.yaml").write_text(text)
    with pytest.raises(HubError, match="llm.name_or_path = .* is a local path"):
        push_to_hub(local, "someone/x")
    with pytest.raises(ValueError, match="owner/name"):
        push_to_hub(path, "not a repo")
