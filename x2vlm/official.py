"""Published X2-VLM checkpoints (the `.th` files of the original release) into x2vlm exports.

    report = import_official("x2vlm_base_1b.th", "exports/x2vlm-base-1b", "bert-base-uncased/")
    print(report.text())          # what was loaded, resized, left unused and missing, by module

The file is read with weights-only unpickling (tensors and plain containers; a pickle that would run code is
refused). The model is described by the shapes in the file (widths, depths, resolution, frames, answers) on top of
the `x2vlm-base` preset: BEiT-2 vision encoder, a BERT text encoder and post-LN BERT fusion layers, the layout the
original code builds. Names map as follows (the pre-training layout's `text_encoder.bert.` is read as
`text_encoder.`):

    vision_encoder.*                                  -> vision.vit.*            (relative_position_index dropped)
    text_encoder.embeddings.*, .encoder.layer.{i<T}.* -> text.encoder.*          (T: the first layer with
    text_encoder.encoder.layer.{T+j}.*                -> fusion.layer.{j}.*       cross-attention)
    cross_encoder.encoder.layer.{j}.*                 -> fusion.layer.{j}.*      (the split text / fusion layout)
    text_encoder.cls.predictions.* (MLM), mlm_head.predictions.*  -> mlm_head.{dense, norm, decoder}
    vision_proj, text_proj -> *.proj; temp [] -> temperature.temp [1]; itm_head, bbox_head -> the same
    cls_head (video / image QA classifier on the fusion [CLS]) -> qa_head
    absolute_frame_pos_embed [1, F, 1, W] -> temporal.frame_embed (sliced or padded to the frame count)

Tensors the model has no place for (the VQA answer decoder `text_decoder.*`, NLVR's pair classifier) are listed
as unused. What the chosen task needs must all be in the file, or nothing is written: a text encoder left at
random cannot pass unnoticed. Parts the task does not need and the file lacks start fresh (a frame embedding at
zero, which adds nothing) and are listed. Relative position tables are resized to the resolution asked for, the
frame embedding to the frame count asked for. The tokenizer written with the export applies X2-VLM's caption
rules (lower case, punctuation to spaces, `<person>` to person) in its normaliser, so training, evaluation and
inference all see text as the original code prepared it.
"""
from __future__ import annotations

import copy
import json
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from x2vlm.config import load_config, read_answer_vocab, update

# What each task needs from the file (top-level parts of x2vlm.model.X2VLM).
ENCODERS = ("vision", "text", "fusion")
TASKS = {
    "pretrain": ENCODERS + ("vision_proj", "text_proj", "temperature", "itm_head", "bbox_head", "mlm_head"),
    "retrieval": ENCODERS + ("vision_proj", "text_proj", "temperature", "itm_head"),
    "grounding": ENCODERS + ("bbox_head",),
    "qa": ENCODERS + ("qa_head",),
    "encoder": ENCODERS,
}
UNUSED_WHY = {"text_decoder": "the VQA answer decoder (answers are generated there; this model classifies)",
              "cls_head": "a classifier of another input width (NLVR's image-pair head)"}
MLM_NAMES = {"transform.dense.": "dense.", "transform.LayerNorm.": "norm.", "decoder.": "decoder."}
PUNCTUATION = r"[,.'!?\"()*#:;~\-/]"  # what X2-VLM's pre_caption turns into spaces


class OfficialFileError(ValueError):
    """A file that cannot be imported; the message is one line."""


# --- reading ---------------------------------------------------------------------------------------------------

def _torch_load(path: Path, shown: str) -> dict:
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # (torch warns about pickle protocols before refusing)
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        code = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln), "")
        if code:
            raise OfficialFileError(f"{shown}: refused: the file holds objects that would run code when loaded, "
                                    f"not only tensors ({code})") from None
        detail = next((ln.strip() for ln in text.splitlines() if "Unsupported" in ln), text.splitlines()[0])
        raise OfficialFileError(f"{shown}: refused: not readable with weights-only loading ({detail})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise OfficialFileError(f"{shown}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None


def read_checkpoint(path: str | Path) -> dict:
    """The state dict of an official file: `{'model': state}` or a bare state dict, saved by torch.save, or a
    tar archive holding one such file. Weights-only: nothing in the file runs."""
    path = Path(path)
    if not path.is_file():
        raise OfficialFileError(f"{path}: file not found")
    if tarfile.is_tarfile(path):  # (before zip: a tar holding a torch file looks like a zip at its end)
        with tarfile.open(path) as tar, tempfile.TemporaryDirectory() as tmp:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith((".th", ".pth", ".pt", ".bin"))]
            if len(members) != 1:
                raise OfficialFileError(f"{path}: expected one checkpoint (.th, .pth, .pt, .bin) in the archive, "
                                        f"found {[m.name for m in members]}")
            target = Path(tmp) / "checkpoint"
            with tar.extractfile(members[0]) as src, open(target, "wb") as dst:
                while block := src.read(1 << 24):
                    dst.write(block)
            obj = _torch_load(target, f"{path}:{members[0].name}")
    else:
        obj = _torch_load(path, str(path))
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OfficialFileError(f"{path}: expected a state dict (name -> tensor), or {{'model': state dict}}")
    return obj


def normalise(state: dict) -> tuple[dict, int]:
    """Names as the fine-tuning layouts have them: no `module.` prefix, `text_encoder.bert.` (and `.roberta.`)
    read as `text_encoder.`, `mlm_head.predictions.` as `text_encoder.cls.predictions.`; buffers the model
    computes itself (relative position indices, position ids) dropped. Returns (state, number dropped)."""
    out, dropped = {}, 0
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.endswith(("relative_position_index", "embeddings.position_ids", "embeddings.token_type_ids")):
            dropped += 1
            continue
        for old in ("text_encoder.bert.", "text_encoder.roberta."):
            if key.startswith(old):
                key = "text_encoder." + key[len(old):]
        if key.startswith("mlm_head.predictions."):
            key = "text_encoder.cls." + key[len("mlm_head."):]
        out[key] = value
    return out, dropped


# --- the layout ------------------------------------------------------------------------------------------------

LAYER = re.compile(r"^(text_encoder|cross_encoder)\.encoder\.layer\.(\d+)\.(.*)$")
BLOCK = re.compile(r"^vision_encoder\.blocks\.(\d+)\.")


@dataclass
class Layout:
    """What a file's shapes say about the model that wrote it."""
    width: int  # vision
    depth: int
    patch: int
    image_size: int
    mlp: int
    text_width: int
    vocab: int
    text_layers: int  # layers without cross-attention
    fusion_layers: int
    intermediate: int
    positions: int
    token_types: int
    frames: int  # 0: no frame embedding
    answers: int  # 0: no QA classifier
    embed_dim: int


def _need(state: dict, key: str, path: str) -> torch.Tensor:
    if key not in state:
        raise OfficialFileError(f"{path}: not an X2-VLM checkpoint: no {key}")
    return state[key]


def describe(state: dict, path: str = "checkpoint") -> Layout:
    """The Layout of a normalised state dict. Depths count up to the highest index present, so that a layer
    missing in the middle shows as missing rather than shrinking the model."""
    from x2vlm.model.resize import rel_pos_grid

    cls = _need(state, "vision_encoder.cls_token", path)
    proj = _need(state, "vision_encoder.patch_embed.proj.weight", path)
    table = _need(state, "vision_encoder.blocks.0.attn.relative_position_bias_table", path)
    mlp = _need(state, "vision_encoder.blocks.0.mlp.fc1.weight", path)
    words = _need(state, "text_encoder.embeddings.word_embeddings.weight", path)
    positions = _need(state, "text_encoder.embeddings.position_embeddings.weight", path)
    token_types = _need(state, "text_encoder.embeddings.token_type_embeddings.weight", path)
    layers: dict[tuple[str, int], bool] = {}  # (encoder, index) -> has cross-attention
    for key in state:
        if m := LAYER.match(key):
            where = (m.group(1), int(m.group(2)))
            layers[where] = layers.get(where, False) or m.group(3).startswith("crossattention.")
    text = [i for enc, i in layers if enc == "text_encoder"]
    cross = [i for (enc, i), c in layers.items() if enc == "text_encoder" and c]
    split = min(cross) if cross else max(text, default=-1) + 1
    fusion = max((i - split + 1 for i in text), default=0) + max((i + 1 for enc, i in layers
                                                                  if enc == "cross_encoder"), default=0)
    if fusion <= 0:
        raise OfficialFileError(f"{path}: not an X2-VLM checkpoint: no fusion layers (no layer with cross-attention)")
    first = f"text_encoder.encoder.layer.{split}." if split in text else "cross_encoder.encoder.layer.0."
    inter = state.get(first + "intermediate.dense.weight")
    try:
        side = (rel_pos_grid(table.shape[0]) + 1) // 2
    except ValueError as e:
        raise OfficialFileError(f"{path}: vision_encoder.blocks.0: {e}") from None
    frames = state.get("absolute_frame_pos_embed")
    head, head_in = state.get("cls_head.3.weight"), state.get("cls_head.0.weight")
    qa = head is not None and head_in is not None and head_in.shape[1] == words.shape[1]
    vision_proj = state.get("vision_proj.weight")
    return Layout(
        width=cls.shape[-1], depth=max(int(m.group(1)) for k in state if (m := BLOCK.match(k))) + 1,
        patch=proj.shape[-1], image_size=side * proj.shape[-1], mlp=mlp.shape[0], text_width=words.shape[1],
        vocab=words.shape[0], text_layers=split, fusion_layers=fusion,
        intermediate=inter.shape[0] if inter is not None else 4 * words.shape[1],
        positions=positions.shape[0], token_types=token_types.shape[0],
        frames=frames.shape[1] if frames is not None else 0, answers=head.shape[0] if qa else 0,
        embed_dim=vision_proj.shape[0] if vision_proj is not None else 256)


def model_config(layout: Layout, image_size: int | None = None, frames: int | None = None,
                 answers: str | None = None):
    """The run configuration of the model a layout describes: the x2vlm-base preset with the file's sizes,
    at `image_size` and `frames` when given (else the file's), with the answer vocabulary `answers`."""
    vision = {"width": layout.width, "depth": layout.depth, "heads": layout.width // 64,
              "patch_size": layout.patch, "image_size": image_size or layout.image_size}
    vision["name"] = {768: "beitv2_base_patch16_224", 1024: "beitv2_large_patch16_224"}.get(
        layout.width, "beitv2_base_patch16_224")
    if layout.mlp != 4 * layout.width:
        vision["extra"] = {"mlp_ratio": layout.mlp / layout.width}
    text = {"hidden_size": layout.text_width, "layers": layout.text_layers, "heads": layout.text_width // 64,
            "intermediate_size": layout.intermediate, "vocab_size": layout.vocab}
    if layout.positions != 512 or layout.token_types != 2:  # XLM-R numbering (CCLM): positions from pad_id + 1
        text.update(model_type="xlm-roberta", extra={"max_position_embeddings": layout.positions,
                                                     "type_vocab_size": layout.token_types, "pad_token_id": 1,
                                                     "layer_norm_eps": 1e-5})
    values = {f"model.vision.{k}": v for k, v in vision.items()}
    values.update({f"model.text.{k}": v for k, v in text.items()})
    values.update({"model.fusion.layers": layout.fusion_layers, "model.fusion.heads": layout.text_width // 64,
                   "model.fusion.intermediate_size": layout.intermediate, "model.embed_dim": layout.embed_dim,
                   "model.video.max_frames": frames or layout.frames or 3, "model.qa_answers": layout.answers,
                   "model.qa_vocab": answers or "", "data.sources": []})
    return update(load_config("x2vlm-base"), values)


# --- names -----------------------------------------------------------------------------------------------------

def map_names(state: dict, layout: Layout) -> tuple[dict, dict]:
    """(tensors under x2vlm names, {unused top-level name: count})."""
    out, unused = {}, {}
    for key, value in state.items():
        new = None
        if key.startswith("vision_encoder."):
            new = "vision.vit." + key[len("vision_encoder."):]
        elif key.startswith("text_encoder.embeddings."):
            new = "text.encoder." + key[len("text_encoder."):]
        elif m := LAYER.match(key):
            enc, i, rest = m.group(1), int(m.group(2)), m.group(3)
            if enc == "cross_encoder":
                new = f"fusion.layer.{i}.{rest}"
            elif i < layout.text_layers:
                new = f"text.encoder.encoder.layer.{i}.{rest}"
            else:
                new = f"fusion.layer.{i - layout.text_layers}.{rest}"
        elif key.startswith("text_encoder.cls.predictions."):
            rest = key[len("text_encoder.cls.predictions."):]
            if rest == "bias":  # the decoder's bias, saved twice
                new = None if "text_encoder.cls.predictions.decoder.bias" in state else "mlm_head.decoder.bias"
                if new is None:
                    continue
            for old, ours in MLM_NAMES.items():
                if rest.startswith(old):
                    new = "mlm_head." + ours + rest[len(old):]
        elif key in ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias"):
            part, name = key.split(".")
            new = f"{part}.proj.{name}"
        elif key == "temp":
            new, value = "temperature.temp", value.reshape(1)
        elif key.startswith(("itm_head.", "bbox_head.")):
            new = key
        elif key.startswith("cls_head.") and layout.answers:
            new = "qa_head." + key[len("cls_head."):]
        elif key == "absolute_frame_pos_embed":
            new = "temporal.frame_embed"
        if new is None:
            top = key.split(".")[0]
            unused[top] = unused.get(top, 0) + 1
        else:
            out[new] = value
    return out, unused


def infer_task(parts: set) -> str:
    """The task a file was saved for, from the parts of the model it fills."""
    if "qa_head" in parts:
        return "qa"
    if {"mlm_head", "itm_head", "bbox_head"} <= parts:
        return "pretrain"
    if "itm_head" in parts:
        return "retrieval"
    if "bbox_head" in parts:
        return "grounding"
    return "encoder"


# --- the tokenizer ---------------------------------------------------------------------------------------------

def caption_rules_tokenizer(tokenizer, out_dir: Path):
    """Save a fast tokenizer to `out_dir` with X2-VLM's caption rules in its normaliser (lower case, `<person>`
    -> person, punctuation -> spaces, then BERT's own normaliser); one that is not a lower-casing BERT WordPiece
    tokenizer is saved as it is. Returns (the tokenizer as saved and loaded back, whether the rules were added)."""
    from tokenizers import Regex, normalizers
    from transformers import AutoTokenizer

    norm = tokenizer.backend_tokenizer.normalizer
    state = json.loads(norm.__getstate__()) if norm is not None else {}
    rules = bool(state.get("type") == "BertNormalizer" and state.get("lowercase"))
    if rules:
        tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([
            normalizers.Lowercase(), normalizers.Replace("<person>", "person"),
            normalizers.Replace(Regex(PUNCTUATION), " "), norm])
    tokenizer.save_pretrained(str(out_dir))
    if rules:  # loaded as a plain fast tokenizer, which keeps the normaliser (BERT's class would rebuild its own)
        config_file = Path(out_dir) / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(config, indent=2))
    return AutoTokenizer.from_pretrained(str(out_dir)), rules


# --- importing -------------------------------------------------------------------------------------------------

def _count_by_part(names) -> dict:
    out: dict = {}
    for name in names:
        top = name.split(".")[0]
        out[top] = out.get(top, 0) + 1
    return out


def _fresh(model, cfg, missing: list) -> dict:
    """Values for the tensors a file lacks: each part built anew with the model's initialisation of fresh parts
    (x2vlm.model.x2vlm.init_fresh); the temperature at its configured start, a frame embedding at zero."""
    from torch import nn

    from x2vlm.model.x2vlm import init_fresh

    out = {}
    for part_name in sorted(_count_by_part(missing)):
        part = copy.deepcopy(getattr(model, part_name)).to_empty(device="cpu")
        covered = {f"{n}.{p}" if n else p for n, m in part.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm))
                   for p, _ in m.named_parameters(recurse=False)}
        part.apply(init_fresh)
        with torch.no_grad():
            for name, p in part.named_parameters():
                if name == "temp":
                    p.fill_(cfg.model.temp)
                elif name == "frame_embed":
                    p.zero_()
                elif name not in covered and f"{part_name}.{name}" in missing:
                    raise RuntimeError(f"no initialisation for the missing tensor {part_name}.{name}")
        state = part.state_dict()
        out.update({f"{part_name}.{k}": v for k, v in state.items() if f"{part_name}.{k}" in missing})
    return out


@dataclass
class ImportReport:
    file: str
    task: str
    layout: Layout
    entries: int  # in the file
    image_size: int
    frames: int
    loaded: dict = field(default_factory=dict)  # part -> tensors
    resized: list = field(default_factory=list)
    unused: dict = field(default_factory=dict)  # official top-level name -> tensors
    dropped_buffers: int = 0
    missing: dict = field(default_factory=dict)  # part -> tensors left fresh
    refused: list = field(default_factory=list)  # parts the task needs that the file lacks (or has only in part)
    tokenizer_rules: bool = False
    out: str = ""

    @property
    def ok(self) -> bool:
        return not self.refused

    def text(self) -> str:
        lay = self.layout
        lines = [f"{self.file}: {self.entries} tensors; vision "
                 f"{lay.width} wide x {lay.depth} blocks at {lay.image_size} px, text {lay.text_layers} + fusion "
                 f"{lay.fusion_layers} layers, {lay.frames or 'no'} frame embedding(s)"
                 + (f", {lay.answers} answers" if lay.answers else ""),
                 f"  task {self.task} (needs {', '.join(TASKS[self.task])})",
                 "  loaded:  " + ", ".join(f"{k} {v}" for k, v in self.loaded.items())]
        if self.resized:
            lines.append(f"  resized to {self.image_size} px, {self.frames} frames: " + "; ".join(self.resized))
        lines.append(f"  dropped: {self.dropped_buffers} buffers the model computes itself "
                     f"(relative position indices, position ids)")
        lines.append("  unused:  " + (", ".join(f"{k} {v}" + (f" ({UNUSED_WHY[k]})" if k in UNUSED_WHY else "")
                                                for k, v in self.unused.items()) or "none"))
        lines.append("  missing: " + (", ".join(f"{k} {v} ({'at zero' if k == 'temporal' else 'fresh'})"
                                                for k, v in self.missing.items()) or "none"))
        if self.refused:
            lines.append(f"  refused: task {self.task} needs {', '.join(self.refused)}, which the file lacks or "
                         f"holds only in part; nothing written (another --task, or the right file)")
        else:
            lines.append(f"  tokenizer: {'X2-VLM caption rules added' if self.tokenizer_rules else 'as given'}")
            lines.append(f"wrote {self.out}")
        return "\n".join(lines)


def import_official(path: str | Path, out: str | Path, tokenizer_dir: str, image_size: int | None = None,
                    frames: int | None = None, task: str | None = None, answers: str | None = None) -> ImportReport:
    """Convert an official checkpoint into an export at `out` (see the module docstring). The report says what
    happened; when the task's parts are not all in the file (report.ok is False) nothing is written."""
    from x2vlm.data.tokenizer import load_tokenizer
    from x2vlm.model import X2VLM
    from x2vlm.pretrained import export_weights, fit_state

    raw = read_checkpoint(path)
    state, dropped = normalise(raw)
    layout = describe(state, str(path))
    if image_size and image_size % layout.patch:
        raise OfficialFileError(f"--image-size {image_size}: expected a multiple of the patch size {layout.patch}")
    if answers:
        if not layout.answers:
            raise OfficialFileError(f"--answers: {path} has no answer classifier")
        read_answer_vocab(answers, layout.answers)
    cfg = model_config(layout, image_size, frames, answers)
    mapped, unused = map_names(state, layout)
    with torch.device("meta"):  # names and shapes only: the weights come from the file
        model = X2VLM(cfg.model, vocab_size=layout.vocab, pad_id=0)
    mapped, resized = fit_state(mapped, model)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in mapped.items()
             if k in own and own[k].shape != v.shape]
    if wrong:
        raise OfficialFileError(f"{path}: tensors of unexpected shapes: {', '.join(wrong[:3])}")
    unused.update(_count_by_part(k for k in mapped if k not in own))
    mapped = {k: v for k, v in mapped.items() if k in own}
    missing = [k for k in own if k not in mapped]
    task = task or infer_task({k.split(".")[0] for k in mapped})
    if task not in TASKS:
        raise OfficialFileError(f"--task {task}: expected one of {', '.join(TASKS)}")
    missing_parts = _count_by_part(missing)
    report = ImportReport(file=str(path), task=task, layout=layout, entries=len(raw),
                          image_size=cfg.model.vision.image_size, frames=cfg.model.video.max_frames,
                          loaded=_count_by_part(mapped), resized=resized, unused=unused, dropped_buffers=dropped,
                          missing=missing_parts,
                          refused=[p for p in TASKS[task] if p in missing_parts])
    if not report.ok:
        return report
    if task == "qa" and not answers:
        raise OfficialFileError("--answers: a QA model needs its answer vocabulary ({answer: label} JSON, e.g. "
                                "the ans2label.json of the fine-tuning data)")
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except (OSError, ValueError) as e:
        raise OfficialFileError(f"--tokenizer {tokenizer_dir}: {str(e).splitlines()[0]}") from None
    if len(tokenizer) != layout.vocab:
        raise OfficialFileError(f"--tokenizer {tokenizer_dir}: {len(tokenizer)} tokens, but the checkpoint's word "
                                f"embeddings have {layout.vocab} rows")
    out = Path(out)
    if (out / "model.safetensors").exists() or (out / "tokenizer").exists():
        raise OfficialFileError(f"--out {out}: already holds an export")
    out.mkdir(parents=True, exist_ok=True)
    _, report.tokenizer_rules = caption_rules_tokenizer(tokenizer, out / "tokenizer")
    weights = {**mapped, **_fresh(model, cfg, missing)}
    weights = {k: weights[k].to(own[k].dtype).contiguous() for k in own}
    storages: set = set()
    for k, v in weights.items():  # tied tensors (the MLM decoder and the word embeddings) are saved apart
        ptr = v.untyped_storage().data_ptr()
        if ptr in storages:
            weights[k] = v.clone()
        storages.add(ptr)
    export_weights(weights, update(cfg, {"model.text.tokenizer": str(tokenizer_dir)}), out, None)
    report.out = str(out)
    return report
