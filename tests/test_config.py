"""Config loading, overrides, errors that name the key, and the resolved dump round trip."""

import pytest

from evlgen.config import Config, ConfigError, dump_yaml, from_dict, list_presets, load_config
from evlgen.model import build


def test_presets_load():
    assert {"tiny", "paper-opt2.7b", "paper-vicuna7b"} <= set(list_presets())
    cfg = load_config("paper-opt2.7b")
    assert cfg.connector.r == 19 and cfg.connector.merge_mode == "mean" and cfg.llm.end_token == "\n"
    assert cfg.vision.family == "blip2" and cfg.caption.num_beams == 5 and cfg.caption.min_new_tokens == 8
    assert cfg.vqa.prompt == "Question: {} Short answer:" and cfg.vqa.max_new_tokens == 10


def test_inherited_preset_replaces_arch_maps_whole():
    cfg = load_config("paper-vicuna7b")
    assert cfg.vision.family == "clip" and cfg.vision.layer == -2
    assert "qkv_bias" not in cfg.vision.arch  # BLIP-2's field must not leak into the CLIP tower
    assert "ffn_dim" not in cfg.llm.arch and cfg.llm.arch["model_type"] == "llama"
    assert cfg.connector.r == 19 and cfg.llm.end_token is None  # inherited / overridden


def test_dotted_overrides():
    cfg = load_config(
        "tiny", ["connector.r=2", "connector.merge_mode=proportional", "vision.arch.image_size=64"]
    )
    assert cfg.connector.r == 2 and cfg.connector.merge_mode == "proportional"
    assert cfg.vision.arch["image_size"] == 64 and cfg.vision.arch["patch_size"] == 8  # merged, not replaced
    cfg = load_config("tiny", ["connector.r=[3, 2]", "llm.end_token=null", "connector.arch.hidden_size=64"])
    assert cfg.connector.r == [3, 2] and cfg.llm.end_token is None and cfg.connector.arch.hidden_size == 64


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("connector.rr=3", "unknown config key 'connector.rr'; valid keys under 'connector': kind, init"),
        ("bogus=1", "unknown config key 'bogus'; valid keys: name, seed, vision"),
        (
            "connector.arch.hiden_size=3",
            "'connector.arch.hiden_size'; valid keys under 'connector.arch': hidden_size",
        ),
        ("connector.r=abc", "config key 'connector.r' must be int | list[int], got 'abc'"),
        (
            "connector.merge_mode=max",
            "'connector.merge_mode' must be one of ['mean', 'weighted', 'proportional']",
        ),
        ("llm.max_text_len=3.5", "'llm.max_text_len' must be an integer"),
        ("vision.image_mean=[1, 2]", "'vision.image_mean' needs 3 values"),
        ("seed=true", "'seed' must be an integer"),
        ("connector.r", "must look like key.sub=value"),
    ],
)
def test_bad_config_names_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert fragment in str(err.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; presets: .*tiny"):
        load_config("nope")


def test_resolved_dump_round_trip(tmp_path):
    cfg = load_config("paper-vicuna7b", ["connector.r=[19, 19, 19, 19, 19, 19, 19, 19, 19, 19, 19, 10]"])
    dump_yaml(cfg, tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again == cfg and isinstance(again, Config)


def test_yaml_base_and_file_errors(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: tiny\nconnector: {r: 2}\n")
    cfg = load_config(str(child))
    assert cfg.connector.r == 2 and cfg.vision.arch["image_size"] == 32
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(str(loop))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_impossible_schedule_fails_before_any_model_is_built(monkeypatch):
    def must_not_build(*a, **k):
        raise AssertionError("a model was built before the schedule was checked")

    monkeypatch.setattr(build, "build_vision", must_not_build)
    cfg = load_config("tiny", ["connector.r=7"])  # 17 -> 10 -> 3 would need 7 at the second layer
    with pytest.raises(ConfigError, match=r"connector.r: .*r=7 at layer 1 where only 10 tokens remain"):
        build.build_vlm(cfg)


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError, match="vision: expected a mapping"):
        from_dict(Config, {"vision": 3})


def test_unparsable_override_value_names_the_override():
    with pytest.raises(
        ConfigError, match=r"override 'vision.arch=\{image_size: 224,': the value is not valid YAML"
    ):
        load_config("tiny", ["vision.arch={image_size: 224,"])


def test_exponent_without_a_dot_is_a_number_for_float_keys_only():
    # YAML 1.1 reads 4e-3 as a string; for a float key it means 0.004.
    assert load_config("tiny", ["train.lr=4e-3"]).train.lr == 0.004
    assert load_config("tiny", ["train.min_lr=-1E+2"]).train.min_lr == -100.0
    with pytest.raises(ConfigError, match="'train.steps' must be an integer, got '1e3'"):
        load_config("tiny", ["train.steps=1e3"])
    with pytest.raises(ConfigError, match="'train.lr' must be a number, got 'e-3'"):
        load_config("tiny", ["train.lr=e-3"])
