"""Command line: `x2vlm demo | pretrain | finetune | make-shards | evaluate | import-official | embed | report`
(also `python -m x2vlm ...`)."""
from __future__ import annotations

import argparse
import json
import sys

from x2vlm import logs
from x2vlm.config import ConfigError, check_paths, load_config
from x2vlm.distributed import StaleBuildLock


def _checked_config(args):
    """The run's configuration; with --resume, its data must be resumable exactly."""
    cfg = check_paths(load_config(args.config, args.overrides))
    if args.resume:
        from x2vlm.data.shards import check_resumable

        check_resumable(cfg.data)
    return cfg


def _pretrain(args) -> int:
    from x2vlm.train.loop import train

    cfg = _checked_config(args)
    train(cfg, resume=args.resume, stage=args.stage, init=args.init)
    return 0


def _finetune(args) -> int:
    from x2vlm.train.loop import train

    cfg = _checked_config(args)
    wanted = {"video_retrieval": "video", "video_qa": "video_qa"}[args.task]
    kinds = sorted({s.kind for s in cfg.data.sources})
    if kinds != [wanted]:
        raise ConfigError(f"data.sources.kind: --task {args.task} trains on {wanted!r} sources only, got {kinds}")
    if args.task == "video_qa" and not cfg.model.qa_answers:
        raise ConfigError("model.qa_answers: --task video_qa needs the answer vocabulary size (e.g. 1500)")
    if args.task == "video_qa":
        cfg = _with_answer_vocab(cfg)
    train(cfg, resume=args.resume, init=None if args.resume else args.checkpoint)
    return 0


def _with_answer_vocab(cfg):
    """A video QA run's configuration with model.qa_vocab set to the ans2label.json that make-shards wrote
    beside its shards, when it names none: its exports then carry their answers."""
    from x2vlm.config import update
    from x2vlm.pretrained import answer_vocab_beside

    if cfg.model.qa_vocab:
        return cfg
    found = answer_vocab_beside([p for s in cfg.data.sources for p in s.shards])
    if not found:
        return cfg
    logs.log.info(f"answer vocabulary {found} (model.qa_vocab): exported with the model")
    return check_paths(update(cfg, {"model.qa_vocab": found}))


def _import_official(args) -> int:
    from x2vlm.official import OfficialFileError, import_official

    try:
        report = import_official(args.file, args.out, args.tokenizer, image_size=args.image_size,
                                 frames=args.frames, task=args.task, answers=args.answers)
    except OfficialFileError as e:
        print(f"x2vlm import-official: error: {e}", file=sys.stderr)
        return 1
    print(report.text(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def _embed(args) -> int:
    import x2vlm
    from x2vlm.inference import embed, write_features

    kind, paths = ("images", args.images) if args.images else ("videos", args.videos)
    if not paths or (args.images and args.videos):
        raise ConfigError("embed: expected --images PATH... or --videos PATH... (files, folders or shards)")
    m = x2vlm.load(args.checkpoint, device=args.device)
    try:
        keys, feats, skipped = embed(m, paths, kind, fps=args.fps, batch_size=args.batch_size)
        files = write_features(args.out, keys, feats)
    except ValueError as e:
        print(f"x2vlm embed: error: {e}", file=sys.stderr)
        return 1
    for reason, n in sorted(skipped.items()):
        print(f"skipped {n}: {reason}")
    print(f"{len(keys)} {kind} -> {feats.shape[1]}-d features: {', '.join(map(str, files))}")
    return 0 if keys else 1


def _demo(args) -> int:
    from x2vlm.demo.run import run_demo

    run_demo(out=args.out, ranks=args.ranks, overrides=args.overrides, n_train=args.train_images,
             n_heldout=args.heldout_images, seed=args.seed)
    return 0


def _report(args) -> int:
    from x2vlm.report import ReportError, write_report

    try:
        path = write_report(args.run_dir)
    except (ReportError, OSError) as e:  # OSError: a folder the report cannot be written into
        print(f"x2vlm report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


FORMATS = ("images", "xvlm", "xvlm-video", "coco", "vg", "refcoco", "csv", "video-retrieval", "video-qa")
ONE_FILE = ("images", "coco", "vg", "refcoco", "csv", "video-retrieval", "video-qa")


def _convert(args) -> list:
    """Shards from annotations in one of FORMATS."""
    from x2vlm.data.formats import coco, images, refcoco, tables, video, vg, xvlm

    common = {"out_dir": args.out, "prefix": args.prefix, "per_shard": args.per_shard, "processes": args.processes}
    if args.format in ONE_FILE and len(args.annotations) > 1:
        raise ConfigError(f"--annotations: --format {args.format} reads one file, got {len(args.annotations)}")
    ann = args.annotations[0]
    if args.format == "images":
        return images.annotations_to_shards(ann, args.image_root, **common)
    if args.format == "xvlm":
        return xvlm.images_to_shards(args.annotations, args.image_root, image_key=args.image_key,
                                     caption_key=args.caption_key, lang=args.lang, **common)
    if args.format == "xvlm-video":
        return xvlm.videos_to_shards(args.annotations, frame_fps=args.frame_fps, **common)
    if args.format == "coco":
        return coco.coco_to_shards(ann, args.image_root, split=args.split, **common)
    if args.format == "vg":
        return vg.vg_to_shards(ann, args.image_root, image_data=args.image_data, **common)
    if args.format == "refcoco":
        return refcoco.refcoco_to_shards(ann, args.image_root, split=args.split, instances=args.instances, **common)
    if args.format == "csv":
        root = args.video_root if args.media == "video" else args.image_root
        return tables.table_to_shards(ann, root, path_column=args.path_column, caption_column=args.caption_column,
                                      delimiter=args.delimiter, media=args.media, **common)
    if args.format == "video-retrieval":
        return video.retrieval_to_shards(ann, args.video_root, split=args.split, video_list=args.video_list,
                                         reencode_gop=args.reencode_gop, **common)
    return video.videoqa_to_shards(ann, args.video_root, ans2label=args.ans2label, vocab_size=args.vocab_size,
                                   mapping=args.video_mapping, reencode_gop=args.reencode_gop, **common)


def _make_shards(args) -> int:
    if args.synthetic:
        from x2vlm.data.samples import write_shards
        from x2vlm.demo.shapesworld import generate

        if args.split not in (None, "train", "heldout"):
            raise ConfigError(f"--split: --synthetic writes train or heldout, got {args.split!r}")
        samples = generate(args.split or "train", args.n, seed=args.seed, image_size=args.image_size)
        paths = write_shards(samples, args.out, args.split or "train", args.per_shard)
    else:
        if not args.annotations:
            raise ConfigError("--annotations: expected the annotation file(s) of the data set (or --synthetic)")
        from x2vlm.data.formats.common import default_processes

        args.processes = default_processes() if args.processes is None else args.processes
        for name, value in (("--per-shard", args.per_shard), ("--processes", args.processes)):
            if value < 1:
                raise ConfigError(f"{name}: expected a positive number, got {value}")
        try:
            paths = _convert(args)
        except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
            if isinstance(e, ConfigError):
                raise
            print(f"x2vlm make-shards: error: {e}", file=sys.stderr)
            return 1
    print(f"wrote {len(paths)} shard(s) to {args.out}")
    return 0


def _plan(args) -> int:
    from x2vlm.train.plan import plan

    cfg = load_config(args.config, args.overrides)
    result = plan(cfg, gpus=args.gpus, gpu_memory_gb=args.gpu_memory, nodes=args.nodes, micro_batch=args.micro_batch,
                  precision=args.precision)
    counts = result["parameters"]
    print(f"{counts['total'] / 1e6:.1f}M parameters ({counts['trainable'] / 1e6:.1f}M trainable), {args.gpus} GPU(s) "
          f"x {args.nodes} node(s) of {args.gpu_memory:g} GB, {args.precision}; activations: "
          f"{result['activation_gb_fixed']:.3f} GB + {result['activation_gb_per_micro_batch_unit']:.3f} GB per "
          f"image (or clip) of every source")
    print(f"{'ZeRO stage':<16}{'model states GB':>16}{'largest micro-batch':>21}" +
          (f"{'GB at ' + str(args.micro_batch):>14}{'fits':>6}" if args.micro_batch else ""))
    for stage, e in result["stages"].items():
        row = f"{stage.replace('_', ' '):<16}{e['model_states_gb']:>16.3f}{e['largest_micro_batch']:>21}"
        if args.micro_batch:
            row += f"{e['total_gb']:>14.3f}{'yes' if e['fits'] else 'no':>6}"
        print(row)
    print(json.dumps(result))
    return 0


def _evaluate(args) -> int:
    from x2vlm.eval.run import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, image_shards=args.images, region_shards=args.regions,
                                 video_shards=args.videos, fps=args.fps, max_frames=args.max_frames,
                                 videoqa_shards=args.videoqa, rerank_k=args.rerank_k, seek=args.seek,
                                 keyframe_tolerance=args.keyframe_tolerance, image_size=args.image_size,
                                 min_regions=args.min_regions)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="x2vlm", description=__doc__)
    # The deepspeed launcher puts --local_rank=N before the subcommand; the rank comes from the environment.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="generate synthetic data, pre-train a tiny model with 2 ranks, evaluate")
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument("--ranks", type=int, default=2, help="processes under the deepspeed launcher (default 2)")
    d.add_argument("--train-images", type=int, default=6000)
    d.add_argument("--heldout-images", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("overrides", nargs="*", help="config overrides for the tiny preset, e.g. train.steps=200")
    d.set_defaults(func=_demo)

    t = sub.add_parser("pretrain", help="pre-train (run under deepspeed, torchrun, or as one process)")
    t.add_argument("--config", required=True, help="preset name (tiny, base, large) or a YAML file")
    t.add_argument("--resume", default=None, help="'latest' or a checkpoint tag such as step400")
    t.add_argument("--stage", default=None, help="run only this stage of train.stages")
    t.add_argument("--init", default=None,
                   help="start from the weights of an exported checkpoint (a checkpoint or run folder)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.fusion.layers=2")
    t.set_defaults(func=_pretrain)

    f = sub.add_parser("finetune", help="fine-tune a pre-trained checkpoint for video retrieval or video QA")
    f.add_argument("--task", required=True, choices=("video_retrieval", "video_qa"))
    f.add_argument("--config", required=True, help="preset name or a YAML file")
    f.add_argument("--checkpoint", required=True, help="pre-trained checkpoint (run or checkpoint folder)")
    f.add_argument("--resume", default=None, help="continue this fine-tuning run: 'latest' or a tag")
    f.add_argument("overrides", nargs="*", help="dotted overrides")
    f.set_defaults(func=_finetune)

    m = sub.add_parser("make-shards", help="write WebDataset shards from a data set's published annotation files",
                       description="Write WebDataset shards from a data set's published annotation files (what is "
                                   "skipped is counted by reason and printed).")
    m.add_argument("--out", required=True)
    m.add_argument("--format", default="images", choices=FORMATS,
                   help="images: {image, caption, regions} JSON/JSONL; xvlm: X-VLM/X2-VLM image-text and region "
                        "JSON lines; xvlm-video: X-VLM video-text JSON lines (base64 frames); coco: COCO captions "
                        "(official, Karpathy's dataset_coco.json, or ALBEF's Karpathy splits); vg: Visual Genome "
                        "region_descriptions.json; refcoco: refs(unc).p + instances.json; csv: a CSV/TSV of (file, "
                        "caption); video-retrieval: MSRVTT (list JSON, the official videodatainfo JSON, the 1k-A "
                        "test CSV); video-qa: MSRVTT-QA / MSVD-QA {video_id, question, answer}")
    m.add_argument("--annotations", nargs="+", help="annotation file(s); xvlm formats also take folders")
    m.add_argument("--image-root", default=".", help="folder that image paths are relative to")
    m.add_argument("--video-root", default=".", help="folder of the videos (<video_id>.mp4)")
    m.add_argument("--reencode-gop", type=float, default=None, metavar="SECONDS",
                   help="video formats: re-encode each video (H.264 mp4, video stream only, about 2.3x larger) with "
                        "a keyframe every SECONDS at the 1-fps sample times, so that reading it decodes little")
    m.add_argument("--prefix", default="data")
    m.add_argument("--per-shard", type=int, default=1000)
    m.add_argument("--processes", type=int, default=None,
                   help="parallel processes (default: the CPU count, at most 8); the shards are the same whatever "
                        "the count")
    m.add_argument("--split", default=None,
                   help="coco (Karpathy's file): e.g. test or train,restval; refcoco: train, val, testA, testB, "
                        "test; video-retrieval (official MSRVTT JSON): train, validate, test; --synthetic: "
                        "train or heldout")
    m.add_argument("--image-key", default=None, help="xvlm: the image's key (default: binary, else a path key)")
    m.add_argument("--caption-key", default=None, help="xvlm: the caption's key (default: caption, else desc)")
    m.add_argument("--lang", default=None, help="xvlm: of per-language captions keep only this language")
    m.add_argument("--frame-fps", type=float, default=1.0,
                   help="xvlm-video: the rate the frames were taken at (not in X-VLM's files; default 1): read "
                        "the shards with this fps")
    m.add_argument("--image-data", default=None, help="vg: image_data.json (file names and sizes)")
    m.add_argument("--instances", default=None, help="refcoco: instances.json (default: beside the pickle)")
    m.add_argument("--path-column", default="path",
                   help="csv: the file column (a name, a 0-based number for a file without header, or a template "
                        "such as {page_dir}/{videoid}.mp4)")
    m.add_argument("--caption-column", default="caption", help="csv: the caption column (a name or a number)")
    m.add_argument("--delimiter", default=None, help="csv: the column delimiter (default: tab for .tsv, else comma)")
    m.add_argument("--media", default="image", choices=("image", "video"), help="csv: images or videos")
    m.add_argument("--video-list", default=None,
                   help="video-retrieval: keep only these videos (a CSV with video_id, e.g. MSRVTT_train.9k.csv)")
    m.add_argument("--video-mapping", default=None, help="video-qa: MSVD's youtube_mapping.txt")
    m.add_argument("--ans2label", default=None, help="video-qa: answer vocabulary JSON (default: built by frequency)")
    m.add_argument("--vocab-size", type=int, default=1500, help="video-qa: answers kept when building the vocabulary")
    m.add_argument("--synthetic", action="store_true", help="write ShapesWorld data instead")
    m.add_argument("--n", type=int, default=1000)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--image-size", type=int, default=64)
    m.set_defaults(func=_make_shards)

    pl = sub.add_parser("plan", help="memory per GPU for each ZeRO stage and the largest micro-batch that fits")
    pl.add_argument("--config", required=True, help="preset name (tiny, base, large) or a YAML file")
    pl.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    pl.add_argument("--gpu-memory", type=float, required=True, help="memory of one GPU in GB")
    pl.add_argument("--nodes", type=int, default=1)
    pl.add_argument("--micro-batch", type=int, default=None, help="images (or clips) of every source per step")
    pl.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.activation_checkpointing=[vision]")
    pl.set_defaults(func=_plan)

    e = sub.add_parser("evaluate", help="retrieval and grounding of a checkpoint on held-out shards")
    e.add_argument("--checkpoint", required=True, help="run folder or exported checkpoint folder")
    e.add_argument("--images", nargs="*", default=[], help="image-text shards for retrieval")
    e.add_argument("--regions", nargs="*", default=[], help="region shards for grounding")
    e.add_argument("--videos", nargs="*", default=[], help="video-text shards for video retrieval")
    e.add_argument("--videoqa", nargs="*", default=[], help="video QA shards (from make-shards --format video-qa)")
    e.add_argument("--fps", type=float, default=1.0, help="video frames sampled per second (default 1)")
    e.add_argument("--max-frames", type=int, default=8,
                   help="most frames per clip (default 8; more than the model's frame embedding covers resizes it)")
    e.add_argument("--seek", default="exact", choices=("exact", "keyframe"),
                   help="exact frames (default), or the nearest keyframe when one lies within --keyframe-tolerance")
    e.add_argument("--keyframe-tolerance", type=float, default=0.5, help="seconds (default 0.5; --seek keyframe)")
    e.add_argument("--rerank-k", type=int, default=16)
    e.add_argument("--image-size", type=int, default=None,
                   help="evaluate at this resolution (position tables are resized; default: the checkpoint's)")
    e.add_argument("--min-regions", type=int, default=2,
                   help="grounding: images with at least this many regions (default 2; 1 for RefCOCO)")
    e.add_argument("--out", default=None, help="write the results JSON here too")
    e.set_defaults(func=_evaluate)

    o = sub.add_parser("import-official", help="convert a published X2-VLM checkpoint (.th) into an export")
    o.add_argument("file", help="the published file (x2vlm_base_1b.th, xvlm_beit_1b_stage2_coco_rerun.th, ...)")
    o.add_argument("--out", required=True, help="export folder to write")
    o.add_argument("--tokenizer", required=True, help="local BERT tokenizer folder (bert-base-uncased)")
    o.add_argument("--image-size", type=int, default=None,
                   help="resolution of the export (default: the file's own; position tables are resized)")
    o.add_argument("--frames", type=int, default=None,
                   help="frames per clip of the export (default: the file's frame embedding, else 3)")
    o.add_argument("--task", default=None, choices=("pretrain", "retrieval", "grounding", "qa", "encoder"),
                   help="what the export must be able to do (default: what the file was saved for); the file "
                        "must hold every part it needs")
    o.add_argument("--answers", default=None, help="qa: the answer vocabulary ({answer: label} JSON)")
    o.set_defaults(func=_import_official)

    b = sub.add_parser("embed", help="features of images or videos (files, folders or shards) from an export")
    b.add_argument("--checkpoint", required=True, help="export, checkpoint or run folder")
    b.add_argument("--images", nargs="*", default=[], help="image files, folders or image shards")
    b.add_argument("--videos", nargs="*", default=[], help="video files, folders or video shards")
    b.add_argument("--out", required=True, help="feats.npy (+ feats.keys.txt) or feats.parquet")
    b.add_argument("--fps", type=float, default=1.0, help="video frames sampled per second (default 1)")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    b.set_defaults(func=_embed)

    r = sub.add_parser("report", help="a run's dashboard as a static HTML page (RUN_DIR/report/index.html)",
                       description="Curves of the losses, throughput, FLOPs and MFU, memory and held-out "
                                   "evaluation of a run (or of every run in a folder, such as the demo's), and the "
                                   "pictures of its last evaluation, as one HTML page: no wandb needed.")
    r.add_argument("run_dir", help="a run's output folder (with metrics.jsonl) or a folder of runs")
    r.set_defaults(func=_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup()
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, StaleBuildLock) as e:
        print(f"x2vlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from x2vlm.train.state import NonFiniteLoss, TooManyBadSamples

        if not isinstance(e, (NonFiniteLoss, TooManyBadSamples)):
            raise
        print(f"x2vlm {args.command}: stopped: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
