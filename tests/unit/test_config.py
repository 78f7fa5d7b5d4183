import pytest

from x2vlm.config import ConfigError, SourceConfig, check_paths, load_config, save_config, update, validate
from x2vlm.data.shards import require_shards


def test_presets_load_and_override():
    cfg = load_config("tiny", ["model.fusion.layers=3", "data.sources.0.batch_size=4", "train.lr=1e-3"])
    assert cfg.model.fusion.layers == 3
    assert cfg.data.sources[0].batch_size == 4
    assert cfg.train.lr == pytest.approx(1e-3)
    base = load_config("base")
    assert (base.model.vision.width, base.model.text.layers, base.model.fusion.layers, base.model.embed_dim) == \
        (768, 12, 6, 256)
    large = load_config("large")
    assert large.model.vision.width == 1024


@pytest.mark.parametrize("override, words", [
    (["model.fusion.layerz=2"], ["model.fusion.layerz", "unknown key"]),
    (["train.lr=fast"], ["train.lr", "expected float"]),
    (["train.steps=1.5"], ["train.steps", "expected int"]),
    (["train.precision=fp8"], ["train.precision", "bf16"]),
    (["data.sources.0.kind=audio"], ["data.sources.0.kind", "image, region"]),
    (["model.vision.image_size=65"], ["model.vision.image_size", "multiple"]),
    (["train.steps=0"], ["train.steps", "positive"]),
    (["data.sources.5.batch_size=1"], ["data.sources.5", "index"]),
    (["train.lr"], ["key=value"]),
    (["train.steps=100"], ["train.steps", "sum of the stages' steps (560)"]),
    (["train.stages.1.sources=[images, sound]"], ["train.stages.1.sources", "'video'", "sound"]),
    (["model.video.aggregator=max"], ["model.video.aggregator", "mean, attention"]),
    (["data.sources.2.max_frames=16"], ["data.sources.2.max_frames", "model.video.max_frames 8"]),
    (["data.sources.2.min_frames=9"], ["data.sources.2.min_frames", "at most max_frames 4"]),
    (["model.fusion.heads=3"], ["model.fusion.heads", "divisor of text.hidden_size 128"]),
    (["train.stages.0.sources=shards"], ["train.stages.0.sources", "expected a list"]),
    (["train.betas=[0.9, fast]"], ["train.betas.1", "expected float"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", override)
    for w in words:
        assert w in str(e.value)


def test_missing_paths_are_reported(tmp_path):
    cfg = load_config("tiny", [f"data.sources.0.shards=[{tmp_path}/nothing-*.tar]"])
    with pytest.raises(ConfigError, match="data.sources.0.shards: source 'images': no shard matches"):
        require_shards(cfg.data.sources)
    with pytest.raises(ConfigError, match="model.vision.init_checkpoint: file not found"):
        check_paths(load_config("tiny", [f"model.vision.init_checkpoint={tmp_path}/missing.pt"]))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")


def test_configurations_built_in_code_are_checked():
    cfg = load_config("tiny")
    clips = SourceConfig(name="clips", kind="video", shards=["a.tar"], max_frames=4)
    new = update(cfg, {"data.sources": [clips], "train.stages": [], "train.steps": 20})
    assert new.data.sources == [clips] and new.train.steps == 20 and cfg.train.steps == 560  # a copy
    with pytest.raises(ConfigError, match="data.sources.0.kind: expected one of"):
        update(cfg, {"data.sources.0.kind": "audio"})
    with pytest.raises(ConfigError, match="train.stepz: unknown key"):
        update(cfg, {"train.stepz": 1})
    with pytest.raises(ConfigError, match="min_frames: source 'bad'"):
        SourceConfig(name="bad", min_frames=5, max_frames=2)
    cfg.train.steps = 7  # changed in place: validate() runs every check again
    with pytest.raises(ConfigError, match="train.steps: expected the sum of the stages' steps"):
        validate(cfg)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("tiny", ["train.stages.0.steps=240", "train.stages.1.steps=7", "train.steps=247"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_the_readme_demo_override_example_loads():
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    example = re.search(r"overrides of the tiny\s+preset, e\.g\. ([^\]]+)\]", readme).group(1).split()
    cfg = load_config("tiny", example)
    assert cfg.train.steps == sum(s.steps for s in cfg.train.stages) and len(example) == 2


def test_the_readme_evaluation_during_training_example_loads():
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"x2vlm pretrain --config base \.\.\. (train\.eval_every=(?:[^\n]*\\\n)*[^\n]*)", readme)
    overrides = shlex.split(block.group(1).replace("\\\n", " "))
    cfg = load_config("base", overrides)
    assert cfg.train.eval_every == 2000 and cfg.train.eval.max_frames == 8 and len(overrides) == 6
    assert cfg.train.eval.videos == ["shards/msrvtt-1ka/*.tar"]
