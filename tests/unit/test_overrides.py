"""Command-line values: shard lists as users type them (braces, globs, commas, with or without brackets), and a
one-line `x2vlm <cmd>: error: <key>: ...` with exit code 2 for every bad override or value, never a traceback."""
import pytest

from x2vlm.cli import main
from x2vlm.config import load_config, split_patterns, update
from x2vlm.data.shards import expand_shards, require_shards


@pytest.fixture()
def shards(tmp_path):
    for name in ("coco-000.tar", "coco-001.tar", "coco-002.tar", "vg-000.tar", "vg-001.tar"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("typed, count", [
    ("[{d}/coco-{{000..001}}.tar]", 2),
    ("{d}/coco-{{000..002}}.tar", 3),
    ("{d}/vg-*.tar", 2),
    ("{d}/coco-000.tar,{d}/vg-*.tar", 3),
    ("[{d}/coco-000.tar, '{d}/vg-001.tar']", 2),
    ("{d}/{{coco,vg}}-000.tar", 2),
    ("{d}", 5),
])
def test_shard_lists_as_users_type_them(shards, typed, count):
    cfg = load_config("tiny", [f"data.sources.0.shards={typed.format(d=shards)}"])
    require_shards(cfg.data.sources[:1])
    assert len(expand_shards(cfg.data.sources[0].shards)) == count


def test_shard_lists_in_code_and_yaml(shards, tmp_path):
    assert split_patterns("[a-{0,1}.tar, b.tar]") == ["a-{0,1}.tar", "b.tar"]
    cfg = update(load_config("tiny"), {"data.sources.0.shards": f"{shards}/coco-{{000..001}}.tar"})
    assert len(expand_shards(cfg.data.sources[0].shards)) == 2
    config = tmp_path / "my.yaml"
    config.write_text("data:\n  sources:\n    - name: coco\n      kind: image\n"
                      f"      shards: {shards}/coco-{{000..002}}.tar\n")
    assert len(expand_shards(load_config(str(config)).data.sources[0].shards)) == 3


@pytest.mark.parametrize("override, starts", [
    ("data.sources.0.shards=[{d}/coco-{{007..008}}.tar]", "data.sources.0.shards: source 'images': no shard matches"),
    ("model.vision.extra={{a: [}}", "model.vision.extra: cannot read"),
    ("data.sources=[{{name: x, shards: a-{{0..1}}.tar}}]", "data.sources: cannot read"),
    ("train.steps=many", "train.steps: expected int"),
    ("data.open_shards=0", "data.open_shards: expected a positive number"),
    ("data.sources.9.batch_size=2", "data.sources.9: expected a list index below 3"),
    ("train.lr", "train.lr: expected key=value"),
    ("=5", "=5: expected a dotted key"),
])
def test_bad_values_end_in_one_line_naming_the_key(shards, capsys, override, starts):
    assert main(["pretrain", "--config", "tiny", override.format(d=shards),
                 f"train.out_dir={shards}/run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"x2vlm pretrain: error: {starts}") and err.count("\n") == 1, err
    assert not (shards / "run").exists()


def test_bad_yaml_file_and_unresumable_remote_shards(tmp_path, shards, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    assert main(["pretrain", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"x2vlm pretrain: error: config: {bad}: not valid YAML") and err.count("\n") == 1
    remote = "data.sources.0.shards=[http://127.0.0.1:9/coco-{000..001}.tar]"
    assert main(["pretrain", "--config", "tiny", "--resume", "latest", remote,
                 f"data.sources.1.shards={shards}/vg-*.tar", f"data.sources.2.shards={shards}",
                 f"train.out_dir={tmp_path}/r"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("x2vlm pretrain: error: data.sources.0.shards: source 'images' streams remote shards")
    assert "data.remote_cache=DIR" in err and err.count("\n") == 1


@pytest.mark.parametrize("evaluation, starts", [
    ([], "train.eval_every: evaluation needs held-out shards in train.eval"),
    (["train.eval.images=[{d}/heldout-*.tar]"], "train.eval.images: no shard matches"),
    (["train.eval.images=[{d}/coco-000.tar]", "train.eval.videos=[{d}/none-{{0..1}}.tar]"],
     "train.eval.videos: no shard matches"),
])
def test_held_out_shards_that_do_not_exist_end_in_one_line(shards, capsys, evaluation, starts):
    data = [f"data.sources.{i}.shards={shards}/coco-*.tar" for i in range(3)]
    held = [e.format(d=shards) for e in evaluation]
    assert main(["pretrain", "--config", "tiny", *data, "train.eval_every=10", *held,
                 f"train.out_dir={shards}/run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"x2vlm pretrain: error: {starts}") and err.count("\n") == 1, err
    assert not (shards / "run").exists()


@pytest.mark.parametrize("override, why", [
    ("train.seed=3", "the demo sets it from --seed"),
    ("train.out_dir=elsewhere", "the demo sets it from --out"),
    ("data.sources.0.shards=[x.tar]", "the demo writes its own data"),
    ("model.text.tokenizer=bert-base-uncased", "the demo trains its tokenizer on its own captions"),
    ("model.fusion.layerz=2", "unknown key"),
    ("train.eval={limit: 50}", "give them one by one (e.g. train.eval.KEY=VALUE)"),
    ("train={seed: 3}", "give them one by one"),
])
def test_the_demo_refuses_what_it_sets_itself_or_does_not_know_before_any_work(tmp_path, capsys, override, why):
    assert main(["demo", "--out", str(tmp_path / "demo"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"x2vlm demo: error: {override.split('=')[0]}: ") and why in err, err
    assert "\n" not in err and not (tmp_path / "demo").exists()


def test_the_demo_keeps_the_users_held_out_settings():
    from x2vlm.demo.run import overridden, pretraining_evaluation

    overrides = ["train.eval.rerank_k=4", "train.eval.limit=50"]
    paths = {"heldout": ["h-000000.tar"], "video_retrieval_test": ["v-000000.tar"]}
    video = load_config("tiny").data.sources[2]
    cfg = update(load_config("tiny", overrides), pretraining_evaluation(overridden(overrides), video, paths))
    e = cfg.train.eval
    assert (e.rerank_k, e.limit, e.images, e.regions, e.videos, cfg.train.eval_every) == (
        4, 50, ["h-000000.tar"], ["h-000000.tar"], ["v-000000.tar"], 100)
    default = update(load_config("tiny"), pretraining_evaluation(overridden([]), video, paths)).train.eval
    assert (default.rerank_k, default.limit) == (load_config("tiny").train.eval.rerank_k, 100)
