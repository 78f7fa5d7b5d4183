"""Importing the published X2-VLM files: for every layout in the reference key lists, a file with exactly those keys
and shapes (random values, written here) imports with nothing missing for its task, every tensor in its place;
the imported BEiT-2 tower equals timm's beitv2_base_patch16_224 and the text tower transformers' BertModel on the
same weights; resolution and frames change on import; a pickle that would run code is refused; a file that lacks
what its task needs is refused and nothing is written.

Real-size files of the base layouts run by default (about a gigabyte each, written once per test run); the large
layouts (2.4 GB) and the remaining base ones run with --full. Every layout also runs shrunk (64 wide, the same
names, resolutions and frame counts), which is fast."""
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import x2vlm  # noqa: F401
from x2vlm.official import TASKS, OfficialFileError, import_official

# Every key and shape of each layout the original code builds (layer indices folded), one file per layout.
KEYS = Path(__file__).resolve().parents[1] / "data" / "x2vlm_official_keys"
LINE = re.compile(r"^(\S+) \[([\d,]*)\]( int64)?(?:\s+i=\[(\d+)\.\.(\d+)\])?$")
TASK_OF = {"pretrain_base_4m": "pretrain", "pretrain_base_1b_stage2": "pretrain",
           "pretrain_large_1b_stage2": "pretrain", "retrieval_base_384": "retrieval",
           "grounding_large_384": "grounding", "msrvttqa_base_224_f5": "qa", "vqa_base_768": "encoder",
           "nlvr_base_384": "encoder", "cclm_base": "pretrain"}
REAL_BY_DEFAULT = ("pretrain_base_1b_stage2", "retrieval_base_384", "msrvttqa_base_224_f5")
SMALL_VOCAB = 200


def layout_keys(name: str) -> dict:
    """{key: (shape, is_int64)} of a reference key list (layer indices unfolded)."""
    out = {}
    for line in (KEYS / f"{name}.txt").read_text().splitlines():
        if not line.strip() or line.startswith("====="):
            continue
        m = LINE.match(line.strip())
        assert m, line
        key, shape, is_int, lo, hi = m.groups()
        shape = [int(x) for x in shape.split(",")] if shape else []
        for i in range(int(lo), int(hi) + 1) if lo else [None]:
            out[key if i is None else key.replace("{i}", str(i))] = (shape, bool(is_int))
    return out


def shrink(keys: dict) -> dict:
    """The same layout 64 wide: widths W, 2W, 3W, 4W -> 64, 128, 192, 256, heads -> 1, vocabularies -> 200."""
    w = keys["vision_encoder.cls_token"][0][-1]
    heads = keys["vision_encoder.blocks.0.attn.relative_position_bias_table"][0][1]
    vocab = keys["text_encoder.bert.embeddings.word_embeddings.weight" if
                 "text_encoder.bert.embeddings.word_embeddings.weight" in keys else
                 "text_encoder.embeddings.word_embeddings.weight"][0][0]
    dims = {w: 64, 2 * w: 128, 3 * w: 192, 4 * w: 256, vocab: SMALL_VOCAB}
    out = {}
    for key, (shape, is_int) in keys.items():
        if key.endswith("relative_position_bias_table"):
            new = [shape[0], 1 if shape[1] == heads else shape[1]]
        else:
            new = [dims.get(d, d) for d in shape]
        out[key] = (new, is_int)
    return out


def write_official(path: Path, keys: dict, seed: int = 0, wrap: bool = True) -> dict:
    """Random values, with the ties of the original models: an MLM decoder shares the word embeddings, and its
    bias is saved twice (decoder.bias and predictions.bias are one tensor)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randint(0, 100, shape, generator=g) if is_int else torch.randn(shape, generator=g) * 0.02
             for k, (shape, is_int) in keys.items()}
    for head, words in (("text_encoder.cls.predictions.", "text_encoder.bert.embeddings.word_embeddings.weight"),
                        ("mlm_head.predictions.", "text_encoder.embeddings.word_embeddings.weight"),
                        ("text_decoder.cls.predictions.", "text_decoder.bert.embeddings.word_embeddings.weight")):
        if head + "bias" in state:
            state[head + "decoder.bias"] = state[head + "bias"]
            if words in state and state[words].shape == state[head + "decoder.weight"].shape:
                state[head + "decoder.weight"] = state[words]
    torch.save({"model": state, "config": {"image_res": 224, "text_fusion_start_at": 12}} if wrap else state, path)
    return state


def bert_vocab_dir(path: Path, size: int) -> Path:
    """A BERT uncased tokenizer folder (vocab.txt + tokenizer_config.json) with `size` tokens."""
    path.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += ["a", "man", "dog", "riding", "person", "blue", "car", "the", "on", "red", "s", "##s"]
    words += [f"w{i}" for i in range(size - len(words))]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}))
    return path


@pytest.fixture(scope="session")
def official(tmp_path_factory):
    """official(name, small) -> (path of a file of that layout, its state dict): written once per test run."""
    root = tmp_path_factory.mktemp("official")
    made = {}

    def get(name: str, small: bool = False):
        if (name, small) not in made:
            keys = layout_keys(name)
            path = root / f"{name}{'-small' if small else ''}.th"
            made[name, small] = path, write_official(path, shrink(keys) if small else keys)
        return made[name, small]
    return get


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    return {"real": bert_vocab_dir(root / "real", 30522), "small": bert_vocab_dir(root / "small", SMALL_VOCAB)}


def expected_name(key: str) -> str | None:
    """Where a published tensor belongs in x2vlm, written from the reference (layers 12-17 are fusion layers)."""
    k = key.replace("text_encoder.bert.", "text_encoder.")
    if k.endswith(("relative_position_index", "position_ids")) or k.startswith("text_decoder."):
        return None
    if k.startswith("vision_encoder."):
        return "vision.vit." + k[len("vision_encoder."):]
    if m := re.fullmatch(r"text_encoder\.encoder\.layer\.(\d+)\.(.+)", k):
        i = int(m.group(1))
        return f"text.encoder.encoder.layer.{i}.{m.group(2)}" if i < 12 else f"fusion.layer.{i - 12}.{m.group(2)}"
    if m := re.fullmatch(r"cross_encoder\.encoder\.layer\.(\d+)\.(.+)", k):
        return f"fusion.layer.{m.group(1)}.{m.group(2)}"
    if k.startswith("text_encoder.embeddings."):
        return "text.encoder." + k[len("text_encoder."):]
    k = k.replace("mlm_head.predictions.", "text_encoder.cls.predictions.")
    mlm = {"transform.dense.weight": "dense.weight", "transform.dense.bias": "dense.bias",
           "transform.LayerNorm.weight": "norm.weight", "transform.LayerNorm.bias": "norm.bias",
           "decoder.weight": "decoder.weight", "decoder.bias": "decoder.bias", "bias": "decoder.bias"}
    if k.startswith("text_encoder.cls.predictions."):
        return "mlm_head." + mlm[k[len("text_encoder.cls.predictions."):]]
    simple = {"vision_proj.weight": "vision_proj.proj.weight", "vision_proj.bias": "vision_proj.proj.bias",
              "text_proj.weight": "text_proj.proj.weight", "text_proj.bias": "text_proj.proj.bias",
              "temp": "temperature.temp", "absolute_frame_pos_embed": "temporal.frame_embed"}
    if k in simple:
        return simple[k]
    if k.startswith(("itm_head.", "bbox_head.")):
        return k
    if k.startswith("cls_head."):
        return "qa_head." + k[len("cls_head."):]
    raise AssertionError(f"unexpected key {key}")


def check_import(name: str, small: bool, official, tokenizers, tmp_path):
    from safetensors.torch import load_file

    from x2vlm.model import X2VLM
    from x2vlm.pretrained import read_config

    path, state = official(name, small)
    answers = None
    if "cls_head.3.weight" in state and TASK_OF[name] == "qa":
        n = state["cls_head.3.weight"].shape[0]
        answers = tmp_path / "ans2label.json"
        answers.write_text(json.dumps({f"answer {i}": i for i in range(n)}))
    tok = tokenizers["small" if small else "real"]
    if name == "cclm_base":  # XLM-R text encoder: the vocabulary size must still match the tokenizer's
        tok = bert_vocab_dir(tmp_path / "xlmr", SMALL_VOCAB if small else 250002)
    report = import_official(path, tmp_path / "out", str(tok), answers=str(answers) if answers else None)
    assert report.ok and report.task == TASK_OF[name], report.text()
    assert not set(report.missing) & set(TASKS[report.task]), report.text()
    # every published tensor is where the reference says, unchanged; unused ones are the VQA decoder (and
    # NLVR's pair classifier)
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    unused = set()
    for key, value in state.items():
        if name == "nlvr_base_384" and key.startswith("cls_head."):
            unused.add(key)
            continue
        ours = expected_name(key)
        if ours is None:
            unused.add(key)
            continue
        assert torch.equal(weights[ours].reshape(value.shape), value.float()), key
    assert {k.split(".")[0] for k in unused if not k.endswith(("_index", "_ids"))} == set(report.unused)
    # the export holds exactly the model's tensors
    cfg = read_config(tmp_path / "out")
    with torch.device("meta"):
        model = X2VLM(cfg.model, vocab_size=cfg.model.text.vocab_size, pad_id=0)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in weights.items()}
    return report, weights, cfg


@pytest.mark.parametrize("name", sorted(TASK_OF))
def test_every_layout_imports_shrunk(name, official, tokenizers, tmp_path):
    report, weights, cfg = check_import(name, True, official, tokenizers, tmp_path)
    if name == "vqa_base_768":  # the answer decoder: 6 layers, embeddings and LM head (its position ids dropped)
        decoder = [k for k in official(name, True)[1] if k.startswith("text_decoder.") and "position_ids" not in k]
        assert report.unused == {"text_decoder": len(decoder)} == {"text_decoder": 6 * 26 + 5 + 7}
        assert cfg.model.vision.image_size == 768
    if name == "msrvttqa_base_224_f5":
        assert cfg.model.video.max_frames == 5 and cfg.model.qa_answers == 1500
        assert (tmp_path / "out" / "answers.json").exists()
    if name == "pretrain_base_4m":  # no frame embedding in the file: it starts at zero, adding nothing
        assert report.missing == {"temporal": 1} and not weights["temporal.frame_embed"].any()
    if name == "cclm_base":
        assert cfg.model.text.model_type == "xlm-roberta" and cfg.model.fusion.layers == 6


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in REAL_BY_DEFAULT else pytest.mark.full)
                                  for n in sorted(TASK_OF) if n != "cclm_base"])
def test_every_layout_imports_at_its_real_size(name, official, tokenizers, tmp_path):
    report, _, cfg = check_import(name, False, official, tokenizers, tmp_path)
    side = 384 if "384" in name else 768 if "768" in name else 224
    assert cfg.model.vision.image_size == side and report.refused == []


def test_imported_towers_equal_timm_beit2_and_transformers_bert(official, tokenizers, tmp_path):
    """On the weights of a real-size pre-training file: our vision tower's patch tokens are timm's BEiT-2
    (fc_norm on the patches, CLIP pixel statistics), its [CLS] their mean; our text tower is BertModel on
    layers 0-11; our fusion is layers 12-17 as transformers' BertLayer computes them (bidirectional)."""
    import timm
    from transformers import BertConfig, BertModel
    from transformers.models.bert.modeling_bert import BertLayer

    from x2vlm.model.vision import PIXEL_STATS
    from x2vlm.pretrained import load_pretrained

    path, state = official("pretrain_base_1b_stage2")
    assert import_official(path, tmp_path / "out", str(tokenizers["real"])).ok
    model, tok, _ = load_pretrained(tmp_path / "out")
    sd = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in state.items()}
    beit = timm.create_model("beitv2_base_patch16_224", pretrained=False, num_classes=0, global_pool="avg").eval()
    beit.load_state_dict({k[len("vision_encoder."):]: v for k, v in sd.items()
                          if k.startswith("vision_encoder.") and not k.endswith("relative_position_index")})
    pixels = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in PIXEL_STATS["clip"])
    with torch.no_grad():
        ours = model.encode_image((pixels - 0.5) / 0.5)
        patches = beit.fc_norm(beit.forward_features((pixels - mean) / std)[:, 1:])
    assert torch.allclose(ours[:, 1:], patches, atol=1e-4) and torch.allclose(ours[:, 0], patches.mean(1), atol=1e-4)

    bert_cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072, attn_implementation="eager")
    bert = BertModel(bert_cfg, add_pooling_layer=False).eval()
    bert.load_state_dict({k[len("text_encoder."):]: v for k, v in sd.items()
                          if k.startswith("text_encoder.") and not k.startswith("text_encoder.cls.")
                          and not re.search(r"\.layer\.(1[2-9])\.", k)}, strict=False)
    loaded = {k for k in bert.state_dict()}
    assert all(("text_encoder." + k) in sd for k in loaded if "position_ids" not in k and "token_type_ids" not in k)
    enc = tok(["A man riding a blue car.", "the dog"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        text = model.encode_text(enc["input_ids"], enc["attention_mask"])
        ref = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    assert torch.allclose(text, ref, atol=1e-4)

    cross_cfg = BertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, is_decoder=True,
                           add_cross_attention=True, attn_implementation="eager")
    layers = torch.nn.ModuleList(BertLayer(cross_cfg) for _ in range(6)).eval()
    layers.load_state_dict({f"{int(m.group(1)) - 12}.{m.group(2)}": v for k, v in sd.items()
                            if (m := re.fullmatch(r"text_encoder\.encoder\.layer\.(1[2-7])\.(.+)", k))})
    big = torch.finfo(torch.float32).min
    self_mask = (1.0 - enc["attention_mask"][:, None, None, :].float()) * big
    with torch.no_grad():
        fused = model.fuse(text, enc["attention_mask"], ours)
        expected = ref
        for layer in layers:
            expected = layer(expected, self_mask, encoder_hidden_states=ours)
    assert torch.allclose(fused, expected, atol=1e-4)


def test_resolution_and_frames_change_on_import(official, tokenizers, tmp_path):
    from safetensors.torch import load_file

    from x2vlm.model.resize import resize_rel_pos_table

    path, state = official("pretrain_base_1b_stage2", True)
    report = import_official(path, tmp_path / "out", str(tokenizers["small"]), image_size=384, frames=8)
    assert report.ok and sorted(report.resized) == ["12 relative position bias tables 27x27 -> 47x47 offsets",
                                                    "frame embedding 3 -> 8 frames"]
    assert "resized to 384 px, 8 frames" in report.text()
    w = load_file(str(tmp_path / "out" / "model.safetensors"))
    key = "vision_encoder.blocks.5.attn.relative_position_bias_table"
    assert torch.equal(w["vision.vit.blocks.5.attn.relative_position_bias_table"],
                       resize_rel_pos_table(state[key], 2212))
    frames = w["temporal.frame_embed"]
    assert frames.shape == (1, 8, 1, 64) and torch.equal(frames[:, :3], state["absolute_frame_pos_embed"])


def cli(*args):
    return subprocess.run([sys.executable, "-m", "x2vlm", "import-official", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_imports_and_refuses_what_the_task_lacks(official, tokenizers, tmp_path):
    path, state = official("retrieval_base_384", True)
    ok = cli(path, "--out", tmp_path / "ok", "--tokenizer", tokenizers["small"])
    assert ok.returncode == 0, ok.stderr
    assert "task retrieval" in ok.stdout and "missing: bbox_head 6 (fresh)" in ok.stdout and "wrote" in ok.stdout
    # the same file cannot make a grounding model: it has no box head
    no = cli(path, "--out", tmp_path / "no", "--tokenizer", tokenizers["small"], "--task", "grounding")
    assert no.returncode == 1 and "refused: task grounding needs bbox_head" in no.stderr
    assert not (tmp_path / "no").exists()
    # a text encoder under names the importer does not know: an error, nothing written
    renamed = {k.replace("text_encoder.", "text_model."): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.th")
    with pytest.raises(OfficialFileError, match="not an X2-VLM checkpoint"):
        import_official(tmp_path / "renamed.th", tmp_path / "no", str(tokenizers["small"]))
    # one text layer gone: the text encoder is incomplete, refused rather than left in part at random
    partial = {k: v for k, v in state.items() if ".layer.3." not in k}
    torch.save({"model": partial}, tmp_path / "partial.th")
    report = import_official(tmp_path / "partial.th", tmp_path / "no", str(tokenizers["small"]))
    assert report.refused == ["text"] and report.missing["text"] == 16
    assert "refused: task retrieval needs text, which the file lacks" in report.text()
    assert not (tmp_path / "no").exists()
    # a fusion layer gone from the middle: the fusion stack keeps its depth and is incomplete, refused
    torch.save({k: v for k, v in state.items() if ".layer.14." not in k}, tmp_path / "gap.th")
    report = import_official(tmp_path / "gap.th", tmp_path / "no", str(tokenizers["small"]))
    assert report.layout.fusion_layers == 6 and report.refused == ["fusion"] and report.missing["fusion"] == 26
    assert not (tmp_path / "no").exists()


class MakesAFile:
    """Unpickling this calls open(path, "w"): code that runs when the file is loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, tokenizers, legacy):
    marker = tmp_path / "created-by-unpickling"
    bad = tmp_path / "bad.th"
    payload = {"model": {"temp": torch.zeros(())}, "config": MakesAFile(str(marker))}
    torch.save(payload, bad, _use_new_zipfile_serialization=not legacy)
    p = cli(bad, "--out", tmp_path / "out", "--tokenizer", tokenizers["small"])
    assert p.returncode == 1 and not marker.exists() and not (tmp_path / "out").exists()
    assert p.stderr.count("\n") == 1 and "refused" in p.stderr and "run code" in p.stderr, p.stderr


def test_a_tar_archive_holding_the_checkpoint_imports(official, tokenizers, tmp_path):
    path, _ = official("grounding_large_384", True)
    with tarfile.open(tmp_path / "x2vlm_large_1b_grounding.tar", "w") as tar:
        tar.add(path, arcname="grounding/checkpoint_best.th")
    report = import_official(tmp_path / "x2vlm_large_1b_grounding.tar", tmp_path / "out", str(tokenizers["small"]))
    assert report.ok and report.task == "grounding" and report.layout.image_size == 384


def test_the_exported_tokenizer_prepares_text_as_x2vlm_does(official, tokenizers, tmp_path):
    """pre_caption: lower case, ,.'!?"()*#:;~ and - / to spaces, <person> to person; then BERT uncased."""
    from x2vlm.data.tokenizer import load_tokenizer, tokenize

    path, _ = official("retrieval_base_384", True)
    assert import_official(path, tmp_path / "out", str(tokenizers["small"])).tokenizer_rules
    tok = load_tokenizer(str(tmp_path / "out" / "tokenizer"))
    plain = load_tokenizer(str(tokenizers["small"]))
    raw = ["A MAN'S dog, riding (the) blue-car!", "<PERSON> on a/red car."]
    clean = ["a man s dog riding the blue car", "person on a red car"]
    assert tokenize(tok, raw, 40)["input_ids"].tolist() == tokenize(plain, clean, 40)["input_ids"].tolist()
    assert tokenize(plain, raw, 40)["input_ids"].tolist() != tokenize(plain, clean, 40)["input_ids"].tolist()
    enc = tokenize(tok, raw, 40)
    assert enc.word_ids(0)[1:4] == [0, 1, 2]  # word ids survive (whole-word masking)
