"""Inference on an export, preprocessing included: features, similarity, ranking with ITM re-rank, grounding and
video question answering. Batched, under torch.inference_mode, no DeepSpeed.

    import x2vlm
    m = x2vlm.load("exports/x2vlm-base-coco", device="cuda")
    img = m.encode_images(["a.jpg", "b.jpg"])             # [2, E], L2-normalised
    txt = m.encode_texts(["a dog on a sofa", "a red car"])
    m.similarity(txt, img)                                # [2, 2] cosine similarities
    m.rank(texts, images, rerank=16)                      # score matrices both ways, ITM re-rank of the top 16
    m.ground("a.jpg", "the dog on the left")              # [x, y, w, h] in a.jpg's own pixels
    m.answer("clip.mp4", "what is the man doing?")        # an answer of the export's vocabulary

Images are prepared as evaluation prepares them (a bicubic square resize to the model's resolution), videos are
sampled at `fps` frames per second (at most the model's frame count, uniformly thinned), texts tokenised with the
export's tokenizer (whose normaliser carries the model's text rules). Ranking uses the evaluation's own code, so
`rank` gives the numbers `x2vlm evaluate` reports on the same export and data.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from x2vlm.boxes import cxcywh_to_xywh
from x2vlm.data.pipeline import pad_clips
from x2vlm.data.tokenizer import tokenize
from x2vlm.data.transforms import eval_transform, frames_to_tensor
from x2vlm.eval.retrieval import encode_pool, itm_rerank, itm_scorer
from x2vlm.pretrained import find_export, load_pretrained, read_answers


def open_image(item):
    """A PIL image from a path, encoded bytes, a PIL image or an HxWx3 uint8 array."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as im:
            return im.convert("RGB")
    if isinstance(item, bytes):
        with Image.open(io.BytesIO(item)) as im:
            return im.convert("RGB")
    if isinstance(item, np.ndarray):
        return Image.fromarray(item)
    raise TypeError(f"an image: expected a path, bytes, a PIL image or an array, got {type(item).__name__}")


class Model:
    """An export ready for inference (see the module docstring); built by `load`."""

    def __init__(self, model, tokenizer, cfg, folder: Path, device, dtype):
        self.model, self.tokenizer, self.cfg, self.folder = model, tokenizer, cfg, folder
        self.device, self.dtype = torch.device(device), dtype
        self.image_size = cfg.model.vision.image_size
        self.frames = cfg.model.video.max_frames
        self.answers = read_answers(folder)

    # --- preprocessing -------------------------------------------------------------------------------------
    def image_tensors(self, images) -> torch.Tensor:
        """[N, 3, S, S] as evaluation prepares images (bicubic resize to S x S)."""
        return torch.stack([eval_transform(open_image(x), [], self.image_size)[0] for x in images])

    def video_frames(self, video, fps: float = 1.0) -> np.ndarray:
        """uint8 [T, H, W, 3]: a video file (or bytes) sampled at `fps` as evaluation samples clips, or frames
        given as an array or a list of images."""
        if isinstance(video, (str, os.PathLike, bytes)):
            from video.decode import read_video

            return read_video(video if isinstance(video, bytes) else str(video), fps=fps, max_frames=self.frames)[0]
        if isinstance(video, np.ndarray):
            return video
        return np.stack([np.asarray(open_image(f).convert("RGB")) for f in video])

    def tokens(self, texts) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tokenize(self.tokenizer, list(texts), self.cfg.model.text.max_len)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype)

    # --- features ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, images, batch_size: int = 32) -> torch.Tensor:
        """L2-normalised contrastive features [N, E] (float32, on CPU) of images (paths, bytes, PIL, arrays)."""
        out = []
        for i in range(0, len(images), batch_size):
            vis = self.model.encode_image(self._in(self.image_tensors(images[i:i + batch_size])))
            out.append(self.model.image_feat(vis).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.cfg.model.embed_dim)

    def video_tokens(self, videos, fps: float) -> torch.Tensor:
        clips, mask = pad_clips([frames_to_tensor(self.video_frames(v, fps), self.image_size) for v in videos])
        return self.model.encode_video(self._in(clips), mask.to(self.device))

    @torch.inference_mode()
    def encode_videos(self, videos, fps: float = 1.0, batch_size: int = 8) -> torch.Tensor:
        """L2-normalised contrastive features [N, E] (float32, on CPU) of videos (paths, bytes, frame arrays),
        sampled at `fps` frames per second, at most the model's frame count."""
        out = []
        for i in range(0, len(videos), batch_size):
            out.append(self.model.image_feat(self.video_tokens(videos[i:i + batch_size], fps)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.cfg.model.embed_dim)

    @torch.inference_mode()
    def encode_texts(self, texts, batch_size: int = 128) -> torch.Tensor:
        """L2-normalised contrastive features [N, E] (float32, on CPU) of texts."""
        out = []
        for i in range(0, len(texts), batch_size):
            ids, atts = self.tokens(texts[i:i + batch_size])
            out.append(self.model.text_feat(self.model.encode_text(ids, atts)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.cfg.model.embed_dim)

    @staticmethod
    def similarity(a, b) -> torch.Tensor:
        """Cosine similarities [len(a), len(b)] of two sets of features from the encode_* methods."""
        a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T

    # --- ranking, grounding, answering ---------------------------------------------------------------------
    @torch.inference_mode()
    def rank(self, texts, images, rerank: int = 0) -> dict:
        """Texts against images (or against videos: `images` then holds video paths or frame arrays, sampled at
        1 frame per second). Returns {"t2i": scores [T, N], "i2t": scores [N, T], "t2i_order": [T, N] item
        indices best first, "i2t_order"}; scores are ITC similarities or, with rerank = k > 0, each query's top k
        re-scored by the ITM head's match log-odds plus the ITC logit and placed above the rest (as `x2vlm
        evaluate`)."""
        videos = len(images) and _is_video(images[0])
        ids, atts = self.tokens(texts)
        if videos:
            encode = lambda i, j: self.video_tokens(images[i:j], 1.0)  # noqa: E731
        else:
            encode = lambda i, j: self.model.encode_image(self._in(self.image_tensors(images[i:j])))  # noqa: E731
        vis, img_f, txt, txt_f = encode_pool(self.model, encode, len(images), ids, atts)
        t2i = (txt_f @ img_f.T).cpu()
        i2t = t2i.T
        if rerank:
            t2i, i2t = itm_rerank(self.model, t2i, rerank, itm_scorer(self.model, vis, txt, atts))["itm_itc"]
        return {"t2i": t2i, "i2t": i2t, "t2i_order": t2i.argsort(dim=1, descending=True, stable=True),
                "i2t_order": i2t.argsort(dim=1, descending=True, stable=True)}

    @torch.inference_mode()
    def ground(self, image, phrases):
        """The box [x, y, w, h] in the image's own pixels that a phrase describes (a list of boxes for a list of
        phrases), from the box head on the fusion [CLS] with the whole image."""
        pil = open_image(image)
        one = isinstance(phrases, str)
        phrases = [phrases] if one else list(phrases)
        vis = self.model.encode_image(self._in(self.image_tensors([pil])))
        ids, atts = self.tokens(phrases)
        pred = cxcywh_to_xywh(self.model.predict_boxes(vis, ids, atts).float().cpu())  # fractions of the image
        boxes = (pred * torch.tensor([pil.width, pil.height, pil.width, pil.height])).tolist()
        return boxes[0] if one else boxes

    @torch.inference_mode()
    def answer(self, video, questions, fps: float = 1.0):
        """The answer (a string of the export's vocabulary) to a question about a video (path, bytes, frames) or
        an image; a list of answers for a list of questions."""
        if self.model.qa_head is None:
            raise ValueError(f"{self.folder}: not a question-answering model (no answer head)")
        if self.answers is None:
            raise ValueError(f"{self.folder}: no answer vocabulary (answers.json) in the export")
        one = isinstance(questions, str)
        questions = [questions] if one else list(questions)
        if _is_video(video):
            vis = self.video_tokens([video], fps)
        else:
            vis = self.model.encode_image(self._in(self.image_tensors([video])))
        ids, atts = self.tokens(questions)
        index = torch.zeros(len(questions), dtype=torch.long, device=self.device)
        labels = self.model.answer_logits(vis, ids, atts, index).argmax(-1).tolist()
        answers = [self.answers[i] for i in labels]
        return answers[0] if one else answers


VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".gif")


def _is_video(item) -> bool:
    """A video file path or frames ([T, H, W, 3] array, list of images); anything else is an image."""
    if isinstance(item, (str, os.PathLike)):
        return str(item).lower().endswith(VIDEO_SUFFIXES)
    if isinstance(item, np.ndarray):
        return item.ndim == 4
    return isinstance(item, (list, tuple))


def load(path: str | Path, device: str | torch.device = "cpu", image_size: int | None = None,
         frames: int | None = None, dtype: torch.dtype = torch.float32) -> Model:
    """An export (or a run or checkpoint folder) ready for inference on `device`, at another resolution or
    frame count than it was saved with when `image_size` / `frames` are given (weights resized on load)."""
    folder = find_export(path)
    model, tokenizer, cfg = load_pretrained(folder, device, image_size=image_size, frames=frames)
    return Model(model.to(dtype), tokenizer, cfg, folder, device, dtype)


# --- feature extraction over files, folders and shards (`x2vlm embed`) ---------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _decode_image_only(key: str, files: dict, rng=None):
    """A shard sample's image alone (no caption needed): (sample {"key", "image"}, {kind: count})."""
    from x2vlm.data.samples import IMAGE_EXTS

    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        return None, {"bad_image": 1}
    try:
        return {"key": key, "image": open_image(files[ext])}, {}
    except Exception:
        return None, {"bad_image": 1}


def input_files(paths, kind: str) -> tuple[list, list]:
    """(files [(key, path)], shards [path]) named by `paths`: files, folders (their image or video files, found
    recursively, keyed by their path under the folder) and shards (.tar files, globs, brace patterns)."""
    from x2vlm.data.shards import expand_shards

    suffixes = IMAGE_SUFFIXES if kind == "images" else VIDEO_SUFFIXES
    files, shards = [], []
    for p in map(str, paths):
        if os.path.isdir(p) and not any(Path(p).glob("*.tar")):
            found = sorted(f for f in Path(p).rglob("*") if f.suffix.lower() in suffixes and f.is_file())
            files += [(f.relative_to(p).as_posix(), str(f)) for f in found]
        elif p.lower().endswith(suffixes) and os.path.isfile(p):
            files.append((p, p))
        else:
            shards += expand_shards(p)
    return files, shards


def iterate_inputs(m: Model, paths, kind: str, fps: float, skipped: dict):
    """(key, image or frames) of every input named by `paths` (see input_files), in order; unreadable ones are
    counted in `skipped` by kind and left out."""
    from x2vlm.data.pipeline import iterate_samples
    from x2vlm.data.samples import ClipDecoder

    files, shards = input_files(paths, kind)
    for key, path in files:
        try:
            yield key, open_image(path) if kind == "images" else m.video_frames(path, fps)
        except Exception:
            name = "bad_image" if kind == "images" else "video_decode"
            skipped[name] = skipped.get(name, 0) + 1
    if shards:
        decode = _decode_image_only if kind == "images" else ClipDecoder(fps, m.frames, train=False)
        for s in iterate_samples(shards, decode, skipped):
            yield s["key"], s["image"] if kind == "images" else s["frames"]


def embed(m: Model, paths, kind: str = "images", fps: float = 1.0, batch_size: int = 32,
          progress: bool = True) -> tuple[list, np.ndarray, dict]:
    """(keys, features [N, E] float32, {skipped kind: count}) of the images or videos (`kind`) named by `paths`."""
    from tqdm import tqdm

    skipped: dict = {}
    keys, feats, batch = [], [], []
    encode = m.encode_images if kind == "images" else lambda items: m.encode_videos(items, fps=fps)

    def flush():
        feats.append(encode([item for _, item in batch]).numpy())
        keys.extend(key for key, _ in batch)
        batch.clear()

    files, _ = input_files(paths, kind)
    bar = tqdm(total=len(files) or None, unit=kind[:-1], disable=not progress)
    for key, item in iterate_inputs(m, paths, kind, fps, skipped):
        batch.append((key, item))
        bar.update(1)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    dim = m.cfg.model.embed_dim
    return keys, (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)), skipped


def write_features(out: str | Path, keys: list, feats: np.ndarray) -> list[Path]:
    """Features to `out`: .npy (the [N, E] array, and the keys one per line in OUT.keys.txt) or .parquet
    (columns key and embedding; needs pyarrow). Returns the files written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, feats.astype(np.float32))
        names = out.with_suffix(".keys.txt")
        names.write_text("".join(f"{k}\n" for k in keys))
        return [out, names]
    if out.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("--out: writing .parquet needs pyarrow (pip install pyarrow); .npy needs nothing") \
                from None
        flat = pa.array(feats.astype(np.float32).reshape(-1))
        table = pa.table({"key": pa.array(keys, pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(flat, feats.shape[1])})
        pq.write_table(table, out)
        return [out]
    raise ValueError(f"--out {out}: expected a .npy or .parquet file")
