"""`x2vlm report RUN_DIR`: a run's dashboard as one static HTML page, for reading runs without wandb.

RUN_DIR is a run's output folder (OUT of a training run: metrics.jsonl, eval.jsonl, media/) or a folder holding
several runs (the demo's: pre-training and its fine-tunes), which get a section each. Per run: the last logged
numbers, curves (matplotlib PNGs) of the losses (mean over ranks, and the largest rank's mean dashed), throughput
per modality, step time and data-loading share, TFLOPs and MFU, memory, learning rate and gradient norm, and the
held-out evaluation; then the pictures of the last evaluation: grounding images with the true and predicted boxes,
retrieval queries with their top 5 and the rank of the right answer, video QA accuracy by question type and right
and wrong answers. Runs of video QA with different temporal aggregators get one table of accuracy by question type
per aggregator. Everything is written to RUN_DIR/report/ (index.html, figures, pictures), which stands alone.
"""
from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

from x2vlm.logs import log
from x2vlm.train.metrics import EVALS, METRICS, evaluation_numbers

REPORT = "report"


class ReportError(ValueError):
    """The folder holds no run to report on."""


def read_records(path: Path) -> list:
    """The records of a JSONL file in step order, the last one of each step (a resumed run logs the steps after
    its checkpoint again). Lines that are not JSON records (a crash can cut the last one short) are left out and
    counted in a warning."""
    by_step, bad = {}, 0
    try:
        text = path.read_text(errors="replace") if path.exists() else ""  # undecodable bytes: a bad line, counted
    except OSError as e:
        raise ReportError(f"{path}: cannot be read ({e.strerror})") from None
    if text:
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and "step" in record:
                by_step[record["step"]] = record
            elif line.strip():
                bad += 1
    if bad:
        log.warning(f"{path}: left out {bad} line(s) that are not JSON records with a step")
    return [by_step[s] for s in sorted(by_step)]


def find_runs(folder: Path) -> list:
    """The run folders (with a metrics.jsonl) at `folder` or up to two levels below it."""
    if (folder / METRICS).exists():
        return [folder]
    found = {p.parent for p in [*folder.glob(f"*/{METRICS}"), *folder.glob(f"*/*/{METRICS}")]
             if REPORT not in p.relative_to(folder).parts}
    return sorted(found, key=started)


def started(run: Path) -> tuple:
    """When a run started (its config.yaml is written first), for listing runs in the order they ran."""
    config = run / "config.yaml"
    return (config.stat().st_mtime if config.exists() else float("inf"), str(run))


# --- figures -------------------------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("the report draws its figures with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series(records: list, key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def stage_starts(records: list) -> list:
    """Steps where a stage began: the last logged step of the stage before (stages log their last step)."""
    out, last = [], None
    for before, r in zip([None, *records], records):
        if "stage" in r and last is not None and r["stage"] != last:
            out.append(before["step"])
        last = r.get("stage", last)
    return out


def figure(path: Path, title: str, panels: list, records: list, stages: list) -> Path | None:
    """One PNG with a panel per (panel title, [(key, label, style)]); keys missing from every record are left out
    (None when nothing at all is left)."""
    panels = [(name, [c for c in curves if series(records, c[0])[0]]) for name, curves in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    plt = _pyplot()
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, curves) in zip(axes.flat, panels):
        for key, label, style in curves:
            x, y = series(records, key)
            ax.plot(x, y, style, label=label, linewidth=1.2, markersize=3)
        for s in stages:
            ax.axvline(s, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def training_panels(records: list) -> dict:
    """Figure title -> panels, from the keys the run logged."""
    keys = {k for r in records for k in r}
    sources = sorted({k.split("/")[0] for k in keys if k.endswith("/loss")})
    terms = ("itc", "itm", "mlm", "bbox", "giou", "qa")
    out = {
        "loss (mean over ranks; dashed: the largest rank's mean)": [
            ("total", [("loss", "mean", "-"), ("loss_max", "max", "--")]),
            *((f"{s}", [(f"{s}/loss", "mean", "-"), (f"{s}/loss_max", "max", "--")]) for s in sources)],
        "loss terms": [(s, [(f"{s}/{t}", t, "-") for t in terms]) for s in sources]
        + [("accuracy", [(f"{s}/{a}", f"{s} {a}", "-") for s in sources for a in ("itm_acc", "qa_acc")])],
        "throughput": [
            ("samples/s (all ranks)", [("samples_per_s", "samples/s", "-")]),
            ("per device, per second", [(f"{k}_per_s", k.replace("_", " "), "-")
                                        for k in ("images", "region_texts", "clips", "frames")]),
            ("step time (s)", [("step_time_s", "step time", "-")]),
            ("data loading (% of step time)", [("data_load_pct", "mean over ranks", "-"),
                                               ("data_load_pct_max", "slowest rank", "--")])],
        "FLOPs": [
            ("TFLOP/s per device", [("tflops_per_device", "model FLOPs", "-")]),
            ("utilisation (%)", [("mfu_pct", "MFU", "-"), ("hfu_pct", "with recomputation", "--")]),
            ("share of the step's FLOPs (%)", [(f"{s}/flops_pct", s, "-") for s in sources])],
        "memory (max over ranks)": [
            ("GB", [(k, k.split("/")[1], "-") for k in ("memory/max_allocated_gb", "memory/max_reserved_gb",
                                                         "memory/peak_rss_gb", "memory/rss_gb")]),
            ("allocator", [("memory/alloc_retries", "retries", "-"), ("memory/ooms", "out of memory", "-")])],
        "optimisation": [("learning rate", [("lr", "lr", "-")]), ("gradient norm", [("grad_norm", "norm", "-")]),
                         ("temperature", [("temp", "temp", "-")])],
    }
    return out


def eval_panels(records: list) -> list:
    keys = {k for r in records for k in r}
    panels = []
    for task, names in (("image_retrieval", ("t2i", "i2t")), ("video_retrieval", ("t2v", "v2t"))):
        panels.append((task.replace("_", " "), [
            *((f"{task}/{n}_r{k}", f"{n} R@{k}", "-o") for n in names for k in (1, 5)),
            *((f"{task}/itm_rerank/{n}_r1", f"{n} R@1 ITM re-rank", "--o") for n in names)]))
    panels.append(("grounding", [("grounding/acc_iou50", "acc@IoU0.5", "-o"), ("grounding/mean_iou", "mean IoU", "-o"),
                                 ("grounding/right_shape", "right shape", "-o"),
                                 ("grounding/random_shape_baseline_acc_iou50", "random shape", ":")]))
    aggregators = sorted({k.split("/")[1] for k in keys if k.startswith("video_direction/")})
    panels.append(("direction of motion", [(f"video_direction/{a}/mean_acc", a, "-o") for a in aggregators]))
    types = sorted({k.split("/")[2] for k in keys if k.startswith("video_qa/by_type/")})
    panels.append(("video QA", [("video_qa/acc", "all", "-o"), ("video_qa/chance", "chance", ":"),
                                *((f"video_qa/by_type/{t}/acc", t, "-") for t in types)]))
    return panels


# --- pictures --------------------------------------------------------------------------------------------------------

def draw_grounding(src: Path, example: dict, dest: Path, scale: int = 4) -> None:
    """The picture enlarged `scale` times with the true (green) and predicted (red) boxes, numbered as the
    phrases are listed."""
    from PIL import Image, ImageDraw

    img = Image.open(src).convert("RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for n, (truth, pred) in enumerate(zip(example["truth"], example["pred"]), 1):
        for (x, y, w, h), colour in ((truth, (40, 200, 60)), (pred, (230, 40, 40))):
            draw.rectangle([x * scale, y * scale, (x + w) * scale, (y + h) * scale], outline=colour, width=2)
            draw.text((x * scale + 3, y * scale + 1), str(n), fill=colour)
    img.save(dest)


class Page:
    """Collects the HTML of the page and copies what it shows into the report folder."""

    def __init__(self, out: Path):
        self.out, self.parts = out, []
        (out / "pictures").mkdir(parents=True, exist_ok=True)

    def add(self, text: str) -> None:
        self.parts.append(text)

    def copy(self, run: Path, rel: str, prefix: str) -> str | None:
        src = run / rel
        if not src.exists():
            return None
        name = f"pictures/{prefix}-{rel.replace('/', '-')}"
        shutil.copyfile(src, self.out / name)
        return name

    def img(self, src: str | None, width: int = 96, title: str = "") -> str:
        if src is None:
            return "(missing)"
        return f'<img src="{html.escape(src)}" width="{width}" title="{html.escape(title)}">'


def esc(x) -> str:
    return html.escape(str(x))


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return esc(v)


def table(header: list, rows: list) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


SUMMARY = (("loss", "loss"), ("samples_per_s", "samples/s (all ranks)"), ("step_time_s", "step time (s)"),
           ("data_load_pct", "data loading (% of step time)"), ("tflops_per_device", "TFLOP/s per device"),
           ("mfu_pct", "MFU (%)"), ("peak_tflops", "peak TFLOP/s per device"), ("memory/max_allocated_gb",
           "max allocated (GB)"), ("memory/peak_rss_gb", "peak RSS (GB)"), ("grad_norm", "gradient norm"))


def run_section(page: Page, run: Path, name: str, index: int) -> dict | None:
    """A run's section; returns its last video QA evaluation (with the run's name) when it has one."""
    records, evals = read_records(run / METRICS), read_records(run / EVALS)
    page.add(f'<h2 id="run{index}">{esc(name)}</h2>')
    if not records:
        page.add("<p>No step logged yet.</p>")
        return None
    last = records[-1]
    took = [e["seconds"] for e in evals if isinstance(e.get("seconds"), (int, float))]
    page.add(f"<p>{len(records)} logged steps, the last at step {last['step']}"
             + (f"; {len(evals)} held-out evaluations" if evals else "")
             + (f" of {sum(took) / len(took):.1f} s on average (left out of the step times)" if took else "")
             + ".</p>")
    rows = [[esc(label), fmt(last[key])] for key, label in SUMMARY if key in last]
    page.add(table(["at the last logged step", ""], rows))
    stages = stage_starts(records)
    for n, (title, panels) in enumerate(training_panels(records).items()):
        path = figure(page.out / f"run{index}-fig{n}.png", title, panels, records, stages)
        if path:
            page.add(f'<p><img src="{path.name}"></p>')
    if not evals:
        return None
    scores = [{"step": e["step"], **evaluation_numbers(e)} for e in evals]
    path = figure(page.out / f"run{index}-eval.png", "held-out evaluation", eval_panels(scores), scores, stages)
    if path:
        page.add(f'<p><img src="{path.name}"></p>')
    latest = evals[-1]
    page.add(f"<h3>Pictures of the evaluation at step {latest['step']}</h3>")
    prefix = f"run{index}"
    grounding_section(page, run, latest.get("grounding"), prefix)
    for task in ("image_retrieval", "video_retrieval"):
        retrieval_section(page, run, task, latest.get(task), prefix)
    qa = latest.get("video_qa")
    if qa and "acc" in qa:  # an evaluation without questions has no accuracy
        qa_section(page, run, qa, prefix)
        return {**qa, "run": name}
    return None


def grounding_section(page: Page, run: Path, g: dict | None, prefix: str) -> None:
    if not g or not g.get("examples"):
        return
    page.add(f"<h4>Grounding: true boxes green, predicted red (accuracy at IoU 0.5 {g['acc_iou50']:.3f} over "
             f"{g['n']} phrases)</h4><div class='pics'>")
    for e in g["examples"]:
        src = run / e["file"]
        if not src.exists():
            continue
        name = f"pictures/{prefix}-grounding-{e['image']}.png"
        draw_grounding(src, e, page.out / name)
        phrases = "".join(f"<li>{esc(p)} (IoU {u:.2f})</li>" for p, u in zip(e["phrases"], e["iou"]))
        page.add(f"<figure><img src='{name}'><figcaption><ol>{phrases}</ol></figcaption></figure>")
    page.add("</div>")


def retrieval_section(page: Page, run: Path, task: str, r: dict | None, prefix: str) -> None:
    if not r or not r.get("examples"):
        return
    what = "images" if task == "image_retrieval" else "clips (middle frame)"
    page.add(f"<h4>{esc(task.replace('_', ' '))}: queries with their top 5 {what} by ITC; framed: a right "
             f"answer</h4>")
    rows = []
    for e in r["examples"]:
        right = set(e["answers"])

        def cell(i, score=None, e=e, right=right):
            pic = page.img(page.copy(run, e["files"][str(i)], prefix), 64)
            style = " class='right'" if i in right else ""
            return f"<span{style}>{pic}</span>" + (f"<br>{score:.3f}" if score is not None else "")
        rows.append([esc(e["text"]), cell(e["item"]), str(e["rank"] + 1), str(e["rank_itm"] + 1),
                     *(cell(i, s) for i, s in zip(e["top"], e["scores"]))])
    page.add(table(["query", "right answer", "rank (ITC)", "rank (ITM re-rank)",
                    *(f"top {i}" for i in range(1, 6))], rows))


def qa_section(page: Page, run: Path, qa: dict, prefix: str) -> None:
    aggregator = qa.get("protocol", {}).get("aggregator", "")
    page.add(f"<h4>Video QA ({esc(aggregator)} aggregator): accuracy {qa['acc']:.3f} over {qa['n']} questions "
             f"(chance {qa['chance']:.3f})</h4>")
    page.add(table(["question type", "questions", "accuracy", "chance"],
                   [[esc(t), str(v["n"]), fmt(v["acc"]), fmt(v["chance"])] for t, v in qa.get("by_type", {}).items()]))
    if qa.get("examples"):
        rows = [[page.img(page.copy(run, e["file"], prefix), 64), esc(e["question"]), esc(e["type"]),
                 esc(e.get("answer", e["label"])), esc(e.get("predicted", e["pred"])),
                 "right" if e["right"] else "<b>wrong</b>"] for e in qa["examples"]]
        page.add(table(["clip", "question", "type", "answer", "predicted", ""], rows))


def aggregator_table(page: Page, runs_qa: list) -> None:
    """Accuracy by question type per temporal aggregator, over the runs that evaluated video QA."""
    by_agg = {}
    for qa in runs_qa:
        agg = qa.get("protocol", {}).get("aggregator", qa["run"])
        by_agg[agg] = qa
    types = sorted({t for qa in by_agg.values() for t in qa.get("by_type", {})})
    aggs = sorted(by_agg)
    rows = [["all types", *(fmt(by_agg[a]["acc"]) for a in aggs)]]
    rows += [[esc(t), *(fmt(by_agg[a].get("by_type", {}).get(t, {}).get("acc", "")) for a in aggs)] for t in types]
    page.add("<h2>Video QA accuracy by question type per aggregator</h2>")
    page.add(table(["question type", *aggs], rows))


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1500px}table{border-collapse:collapse;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:middle}th{background:#f3f3f3}
.pics{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}figcaption{font-size:12px;max-width:280px}
.right img{outline:3px solid #2a2}img{image-rendering:pixelated}"""


def write_report(folder: str | Path) -> Path:
    """The report of the run (or runs) in `folder`, written to FOLDER/report/index.html; returns its path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder}: no such folder")
    runs = find_runs(folder)
    if not runs:
        raise ReportError(f"{folder}: not a run folder (no {METRICS} in it or in its subfolders)")
    out = folder / REPORT
    if out.exists():
        shutil.rmtree(out)
    page = Page(out)
    names = [str(r.relative_to(folder)) if r != folder else folder.name for r in runs]
    page.add(f"<h1>x2vlm: {esc(folder.resolve().name)}</h1>")
    if len(runs) > 1:
        page.add("<p>" + " | ".join(f'<a href="#run{i}">{esc(n)}</a>' for i, n in enumerate(names)) + "</p>")
    qa_runs = [qa for i, (run, name) in enumerate(zip(runs, names)) if (qa := run_section(page, run, name, i))]
    if len(qa_runs) > 1:
        aggregator_table(page, qa_runs)
    index = out / "index.html"
    index.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>x2vlm report: {esc(folder.name)}"
                     f"</title><style>{STYLE}</style></head><body>{''.join(page.parts)}</body></html>\n")
    return index
