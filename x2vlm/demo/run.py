"""`x2vlm demo`: the whole system on a CPU in minutes.

Generates ShapesWorld images and clips, trains a WordPiece tokenizer on their texts, writes WebDataset shards,
pre-trains the tiny preset with 2 ranks under the deepspeed launcher (ZeRO-2; bf16 where the hardware supports
it), evaluating a small held-out subset as it trains, and evaluates retrieval and grounding on held-out images
(and zero-shot video retrieval on held-out clips when the preset has a video stage). With a video stage it also
writes the clips in the published video-text formats (MSRVTT retrieval, MSRVTT-QA), converts them with the
`make-shards` converters, fine-tunes the pre-trained checkpoint with `x2vlm finetune` for video retrieval and,
once per temporal aggregator, for video QA (each evaluated on part of its test split as it trains), and evaluates
those. Everything goes to `OUT/results.json` and a summary table; `OUT/report/index.html` shows every run's
curves and pictures (`x2vlm report`).
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from x2vlm import launch
from x2vlm.config import ConfigError, SourceConfig, load_config, save_config, update
from x2vlm.report import write_report

# Fine-tuning in the demo, per task: (kind of the data source, settings). Clips are sampled as in pre-training.
# Retrieval trains the whole model; QA keeps the vision encoder as pre-trained (a frozen encoder computes no
# gradient, so a QA step costs less than half as much, and its frame features are what the temporal aggregator and
# the fusion encoder learn to read).
FINETUNES = {
    "video_retrieval": ("video", {"train.steps": 40, "train.warmup_steps": 10, "train.lr": 2.0e-4,
                                  "train.eval_every": 20}),
    "video_qa": ("video_qa", {"train.steps": 400, "train.warmup_steps": 15, "train.lr": 1.0e-3,
                              "model.vision.frozen": True, "train.eval_every": 100}),
}
# Held-out evaluation while training, on the first images or clips of the held-out (test) splits: small enough to
# be cheap. Pre-training evaluates every EVAL_EVERY steps; the fine-tunes as FINETUNES says.
EVAL_EVERY = 100
EVAL_LIMIT = {"pretrain": 100, "video_retrieval": 100, "video_qa": 40}
FINETUNE_BATCH = 16
QA_QUESTIONS = 8  # questions per clip and step in QA fine-tuning: every question of a ShapesWorld clip (at most 7)
AGGREGATORS = ("mean", "attention")  # QA is fine-tuned once with each; mean's run is the shorter


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def prepare_data(out: Path, n_train: int, n_heldout: int, seed: int, image_size: int, shards_per_source: int,
                 n_train_clips: int = 0, n_heldout_clips: int = 0):
    """ShapesWorld train and held-out splits as shards (images, and video clips when asked), and a tokenizer
    trained on the training texts. With clips, the same clips also go out in the published formats (training
    clips as the train split, held-out clips as the test split) and through the converters: shards for video
    retrieval and video QA fine-tuning and evaluation. Samples are drawn by two processes."""
    from x2vlm.data.samples import write_shards
    from x2vlm.data.tokenizer import train_tokenizer
    from x2vlm.demo.shapesworld import corpus, generate

    data = out / "data"
    with ProcessPoolExecutor(2) as pool:
        spread = partial(pool.map, chunksize=50)
        train = generate("train", n_train, seed=seed, image_size=image_size, map_fn=spread)
        heldout = generate("heldout", n_heldout, seed=seed + 1, image_size=image_size, map_fn=spread)
        if n_train_clips:
            from x2vlm.demo.shapesworld_video import generate_clips

            clips = generate_clips("train", n_train_clips, seed=seed, size=image_size, map_fn=spread)
            held = generate_clips("heldout", n_heldout_clips, seed=seed + 1, size=image_size, map_fn=spread)
    texts = corpus(train)
    per = -(-n_train // shards_per_source)
    paths = {
        # One set of training images serves both sources: as captioned images, and with their regions.
        "train": write_shards(train, str(data), "train", per),
        "heldout": write_shards(heldout, str(data), "heldout", n_heldout),
    }
    unseen = sum(bool(s.get("unseen")) for s in heldout)
    _say(f"{n_train} training and {n_heldout} held-out images ({unseen} held-out images show a colour-shape "
         f"pair never seen in training); {len(paths['train'])} training shards")
    if n_train_clips:
        from x2vlm.data.samples import write_video_shards
        from x2vlm.demo.shapesworld_video import shard_samples, video_corpus

        texts += video_corpus(clips)
        per_video = -(-n_train_clips // shards_per_source)
        paths["train_video"] = write_video_shards(shard_samples(clips), str(data), "train-video", per_video)
        _say(f"{n_train_clips} training and {n_heldout_clips} held-out video clips (mp4, "
             f"{len(paths['train_video'])} training shards)")
        paths.update(convert_published(clips, held, data, per_video))
    train_tokenizer(texts, str(out / "tokenizer"))
    return paths


def convert_published(train_clips: list, test_clips: list, data: Path, per_shard: int) -> dict:
    """Write the clips in the published formats under DATA/published and convert them as `x2vlm make-shards
    --format video-retrieval | video-qa` does: retrieval shards, and QA shards whose answer vocabulary is built
    from the training answers and given to the test split."""
    from x2vlm.data.formats.video import retrieval_to_shards, videoqa_to_shards
    from x2vlm.demo.shapesworld_video import write_published_formats

    files = write_published_formats({"train": train_clips, "test": test_clips}, data / "published")
    videos, ret, qa = files["videos"], str(data / "video_retrieval"), str(data / "video_qa")
    big = max(1, len(test_clips))
    paths = {"video_retrieval_train": retrieval_to_shards(files["retrieval"]["train"], videos, ret, "train",
                                                          per_shard),
             "video_retrieval_test": retrieval_to_shards(files["retrieval"]["test"], videos, ret, "test", big),
             "video_qa_train": videoqa_to_shards(files["qa"]["train"], videos, qa, "train", per_shard)}
    paths["video_qa_test"] = videoqa_to_shards(files["qa"]["test"], videos, qa, "test", big,
                                               ans2label=str(Path(qa) / "ans2label.json"))
    paths["answers"] = len(json.loads((Path(qa) / "ans2label.json").read_text()))
    return paths


def start_jobs(jobs: list, log_dir: Path) -> list:
    """Start `x2vlm ARGS` under the deepspeed launcher for each job (name, args, ranks), all at the same time; each
    job's output goes to LOG_DIR/NAME.log and its progress lines are echoed."""
    running = []
    for name, args, ranks in jobs:
        _say(f"launching: deepspeed --num_gpus {ranks} --module x2vlm {' '.join(map(str, args))}")
        running.append(launch.start(args, ranks, log_dir / f"{name}.log", name=name if len(jobs) > 1 else ""))
    return running


def held_out(video: SourceConfig | None, limit: int, **shards) -> dict:
    """train.eval for the held-out shards given (images=, regions=, videos=, videoqa=), each cut to its first
    `limit` images or clips; clips sampled as the `video` source samples them."""
    sampling = {"fps": video.fps, "max_frames": video.max_frames} if video else {}
    return {**{k: list(v) for k, v in shards.items() if v}, "limit": limit, "examples": 8, **sampling}


# Settings the demo makes itself (its data, tokenizer, folder and seed): an override of one is refused, saying why.
DEMO_SETS = {"train.out_dir": "the demo sets it from --out", "train.seed": "the demo sets it from --seed",
             "model.text.tokenizer": "the demo trains its tokenizer on its own captions",
             "shards": "the demo writes its own data (sized by --train-images and --heldout-images)"}


# Whole sections that hold some of those settings: the demo takes their keys one by one.
DEMO_SECTIONS = ("train", "model", "model.text", "data", "train.eval")


def overridden(overrides: list[str] | None) -> set:
    """The keys the user's overrides set; a key the demo sets itself, or a whole section holding one, is refused
    with a one-line error."""
    given = {o.split("=", 1)[0].strip() for o in overrides or []}
    for key in sorted(given):
        instead = DEMO_SETS["shards"] if key.startswith("data.") and key.endswith(".shards") else DEMO_SETS.get(key)
        if key in DEMO_SECTIONS:
            instead = f"the demo sets some of its keys itself; give them one by one (e.g. {key}.KEY=VALUE)"
        if instead:
            raise ConfigError(f"{key}: not an override for the demo: {instead}")
    return given


def pretraining_evaluation(given: set, video: SourceConfig | None, paths: dict) -> dict:
    """train.eval_every and the train.eval entries of the pre-training run: the demo's held-out sets and cadence,
    except what the user's overrides set (those, and every other train.eval entry, stay as the overrides made
    them)."""
    evaluation = held_out(video, EVAL_LIMIT["pretrain"], images=paths["heldout"], regions=paths["heldout"],
                          videos=paths.get("video_retrieval_test"))
    out = {f"train.eval.{k}": v for k, v in evaluation.items() if f"train.eval.{k}" not in given}
    return out if "train.eval_every" in given else {"train.eval_every": EVAL_EVERY, **out}


def finetune_job(outp: Path, name: str, task: str, shards: list, video: SourceConfig, settings: dict,
                 test: list) -> tuple:
    """A fine-tuning job: its config (the pre-training run's, with one source of the task's kind that samples clips
    as the pre-training `video` source does, the demo's fine-tuning settings, and evaluation on the first clips of
    the `test` shards as it trains) is written to OUT/NAME.yaml; it starts from the pre-trained run."""
    kind, task_settings = FINETUNES[task]
    source = SourceConfig(name=name, kind=kind, shards=list(shards), batch_size=FINETUNE_BATCH, fps=video.fps,
                          max_frames=video.max_frames, min_frames=video.min_frames,
                          max_texts=QA_QUESTIONS if kind == "video_qa" else SourceConfig.max_texts)
    cfg = load_config(str(outp / "config.yaml"))
    evaluation = held_out(video, EVAL_LIMIT[task], **{"videos" if task == "video_retrieval" else "videoqa": test})
    cfg = update(cfg, {"train.stages": [], "data.sources": [source], "train.out_dir": str(outp / name),
                       "train.eval": evaluation, **task_settings, **settings})
    cfg = update(cfg, {"train.save_every": cfg.train.steps})
    save_config(cfg, outp / f"{name}.yaml")
    return name, ["finetune", "--task", task, "--config", outp / f"{name}.yaml", "--checkpoint", outp / "run"], 1


def video_qa_summary(by_aggregator: dict) -> dict:
    """One entry for the QA runs: the attention run's results, with the accuracy overall and by type of every
    aggregator beside them."""
    out = dict(by_aggregator["attention"])
    out["by_aggregator"] = {a: r["acc"] for a, r in by_aggregator.items()}
    out["by_type_by_aggregator"] = {a: {t: v["acc"] for t, v in r["by_type"].items()}
                                    for a, r in by_aggregator.items()}
    out["runs"] = {a: r for a, r in by_aggregator.items() if a != "attention"}
    return out


def summary_table(results: dict) -> str:
    r, g = results["image_retrieval"], results["grounding"]
    chance = 1.0 / r["pool_size"]
    rr = r["itm_rerank"]
    rows = [
        ("retrieval, pool of %d" % r["pool_size"], "model", "chance"),
        ("text->image R@1  (ITC)", f"{r['t2i_r1']:.3f}", f"{chance:.3f}"),
        ("text->image R@5  (ITC)", f"{r['t2i_r5']:.3f}", f"{5 * chance:.3f}"),
        ("image->text R@1  (ITC)", f"{r['i2t_r1']:.3f}", f"{chance:.3f}"),
        ("text->image R@1  (ITM re-rank top %d)" % rr["k"], f"{rr['t2i_r1']:.3f}", f"{chance:.3f}"),
        ("image->text R@1  (ITM re-rank top %d)" % rr["k"], f"{rr['i2t_r1']:.3f}", f"{chance:.3f}"),
        ("grounding, %d phrases" % g["n"], "model", "random shape"),
        ("accuracy at IoU 0.5", f"{g['acc_iou50']:.3f}", f"{g['random_shape_baseline_acc_iou50']:.3f}"),
        ("mean IoU", f"{g['mean_iou']:.3f}", ""),
        ("right shape picked", f"{g['right_shape']:.3f}", ""),
    ]
    for key, what in (("video_retrieval", "zero-shot"), ("finetune_video_retrieval", "fine-tuned")):
        if key in results:
            v = results[key]
            c = 1.0 / v["pool_size"]
            rows += [(f"video retrieval, pool of {v['pool_size']} clips ({what})", "model", "chance"),
                     ("text->video R@1  (ITC)", f"{v['t2v_r1']:.3f}", f"{c:.3f}"),
                     ("text->video R@5  (ITC)", f"{v['t2v_r5']:.3f}", f"{5 * c:.3f}"),
                     ("video->text R@1  (ITC)", f"{v['v2t_r1']:.3f}", f"{c:.3f}"),
                     ("text->video R@1  (ITM re-rank top %d)" % v["itm_rerank"]["k"],
                      f"{v['itm_rerank']['t2v_r1']:.3f}", f"{c:.3f}")]
    for name, d in results.get("video_direction", {}).items():
        if isinstance(d, dict) and d.get("n"):
            rows.append((f"direction of motion, {name} pooling ({d['n']} clips, fwd+rev)", f"{d['mean_acc']:.3f}",
                         f"{d['chance']:.3f}"))
    if "video_qa" in results:
        q = results["video_qa"]
        rows.append((f"video QA, {q['n']} questions (fine-tuned)", "/".join(q["by_aggregator"]), "chance"))
        rows.append(("all types", "/".join(f"{a:.3f}" for a in q["by_aggregator"].values()), f"{q['chance']:.3f}"))
        for t, v in q["by_type"].items():
            accs = "/".join(f"{r[t]:.3f}" for r in q["by_type_by_aggregator"].values())
            rows.append((f"{t} ({v['n']})", accs, f"{v['chance']:.3f}"))
    w = max(len(a) for a, _, _ in rows)
    wb = max(8, max(len(b) for _, b, _ in rows))
    return "\n".join(f"{a:<{w}}  {b:>{wb}}  {c:>12}" for a, b, c in rows)


def run_demo(out: str = "runs/demo", ranks: int = 2, overrides: list[str] | None = None, n_train: int = 6000,
             n_heldout: int = 300, seed: int = 0, n_train_clips: int = 1200, n_heldout_clips: int = 200) -> dict:
    from x2vlm.eval.run import evaluate_checkpoint

    given = overridden(overrides)
    base = load_config("tiny", overrides)
    start = time.time()
    outp = Path(out).resolve()
    outp.mkdir(parents=True, exist_ok=True)
    video = [s for s in base.data.sources if s.kind == "video"]
    paths = prepare_data(outp, n_train, n_heldout, seed, base.model.vision.image_size,
                         shards_per_source=max(4, 2 * ranks), n_train_clips=n_train_clips if video else 0,
                         n_heldout_clips=n_heldout_clips if video else 0)
    shards = {"image": paths["train"], "region": paths["train"], "video": paths.get("train_video")}
    evaluation = pretraining_evaluation(given, video[0] if video else None, paths)
    cfg = update(base, {**{f"data.sources.{i}.shards": shards[s.kind] for i, s in enumerate(base.data.sources)},
                        "model.text.tokenizer": str(outp / "tokenizer"), "train.out_dir": str(outp / "run"),
                        "train.seed": seed, **evaluation})
    save_config(cfg, outp / "config.yaml")
    _say(f"data ready in {time.time() - start:.0f}s; pre-training {cfg.train.steps} steps")
    launch.wait(start_jobs([("pretrain", ["pretrain", "--config", outp / "config.yaml"], ranks)], outp))
    _say(f"pre-training done at {time.time() - start:.0f}s")
    fps, frames = (video[0].fps, video[0].max_frames) if video else (1.0, 8)
    if video:  # fine-tuning starts first; the pre-trained model is evaluated while it runs
        _say("fine-tuning for video retrieval and video QA")
        finetunes = start_jobs([
            finetune_job(outp, "finetune_video_retrieval", "video_retrieval", paths["video_retrieval_train"],
                         video[0], {}, paths["video_retrieval_test"]),
            *(finetune_job(outp, f"finetune_video_qa_{a}", "video_qa", paths["video_qa_train"], video[0],
                           {"model.qa_answers": paths["answers"], "model.video.aggregator": a},
                           paths["video_qa_test"])
              for a in AGGREGATORS)], outp)
    _say("evaluating the pre-trained model on held-out data")
    results = evaluate_checkpoint(str(outp / "run"), image_shards=paths["heldout"], region_shards=paths["heldout"],
                                  video_shards=paths.get("video_retrieval_test", ()), fps=fps, max_frames=frames)
    if video:  # each fine-tuned model is evaluated as soon as its run ends, while the others go on
        test = {"fps": fps, "max_frames": frames}
        launch.wait(finetunes[:1])
        results["finetune_video_retrieval"] = evaluate_checkpoint(
            str(outp / "finetune_video_retrieval"), video_shards=paths["video_retrieval_test"], probe_direction=False,
            **test)["video_retrieval"]
        qa_results = {}
        for a, job in zip(AGGREGATORS, finetunes[1:]):
            launch.wait([job])
            qa_results[a] = evaluate_checkpoint(str(outp / f"finetune_video_qa_{a}"),
                                                videoqa_shards=paths["video_qa_test"], **test)["video_qa"]
        _say(f"fine-tuned models evaluated at {time.time() - start:.0f}s")
        results["video_qa"] = video_qa_summary(qa_results)
    results["wall_seconds"] = round(time.time() - start, 1)
    (outp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(summary_table(results), flush=True)
    _say(f"results in {outp / 'results.json'} ({results['wall_seconds']:.0f}s in all)")
    _say(f"report: {write_report(outp)} (curves of every run, held-out pictures; `x2vlm report {outp}` again)")
    return results
