import pytest

from x2vlm.config import ConfigError, load_config, save_config


def test_presets_load_and_override():
    cfg = load_config("tiny", ["model.fusion.layers=3", "data.sources.0.batch_size=4", "train.lr=1e-3"],
                      check_paths=False)
    assert cfg.model.fusion.layers == 3
    assert cfg.data.sources[0].batch_size == 4
    assert cfg.train.lr == pytest.approx(1e-3)
    base = load_config("base", check_paths=False)
    assert (base.model.vision.width, base.model.text.layers, base.model.fusion.layers, base.model.embed_dim) == \
        (768, 12, 6, 256)
    large = load_config("large", check_paths=False)
    assert large.model.vision.width == 1024


@pytest.mark.parametrize("override, words", [
    (["model.fusion.layerz=2"], ["model.fusion.layerz", "unknown key"]),
    (["train.lr=fast"], ["train.lr", "expected float"]),
    (["train.steps=1.5"], ["train.steps", "expected int"]),
    (["train.precision=fp8"], ["train.precision", "bf16"]),
    (["data.sources.0.kind=audio"], ["data.sources.kind", "image, region"]),
    (["model.vision.image_size=65"], ["model.vision.image_size", "multiple"]),
    (["train.steps=0"], ["train.steps", "positive"]),
    (["data.sources.5.batch_size=1"], ["data.sources.5", "index"]),
    (["train.lr"], ["key=value"]),
    (["train.steps=100"], ["train.steps", "sum of the stages' steps (340)"]),
    (["train.stages.1.sources=[images, sound]"], ["train.stages.sources", "'video'", "sound"]),
    (["model.video.aggregator=max"], ["model.video.aggregator", "mean, attention"]),
    (["data.sources.2.max_frames=16"], ["data.sources.max_frames", "model.video.max_frames 8"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", override, check_paths=False)
    for w in words:
        assert w in str(e.value)


def test_missing_paths_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="data.sources.shards.*no shard matches"):
        load_config("tiny", [f"data.sources.0.shards=[{tmp_path}/nothing-*.tar]",
                             f"data.sources.1.shards=[{tmp_path}/nothing-*.tar]"])
    with pytest.raises(ConfigError, match="model.vision.init_checkpoint: file not found"):
        load_config("tiny", [f"model.vision.init_checkpoint={tmp_path}/missing.pt"], check_paths=True)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("tiny", ["train.stages.0.steps=240", "train.stages.1.steps=7", "train.steps=247"],
                      check_paths=False)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml"), check_paths=False) == cfg
