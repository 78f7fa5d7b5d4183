"""The layout's promises, read from the source: imports point down the layers only (video/ knows nothing of x2vlm,
evaluation never imports the trainer), and every collective goes through x2vlm/distributed.py."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Lower numbers are lower layers; a module may import its own layer and those below.
LAYERS = [
    ("video",),
    ("x2vlm._compat", "x2vlm.config", "x2vlm.distributed", "x2vlm.boxes", "x2vlm.logs"),
    ("x2vlm.data",),
    ("x2vlm.ops", "x2vlm.losses", "x2vlm.model"),
    ("x2vlm.objectives",),
    ("x2vlm.pretrained", "x2vlm.official"),
    ("x2vlm.eval", "x2vlm.inference"),  # inference ranks with the evaluation's own code
    ("x2vlm.train",),
    ("x2vlm.cli", "x2vlm.demo", "x2vlm.launch", "x2vlm.report", "x2vlm.__main__"),  # report: reads what runs write
]
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "gather", "gather_object", "scatter", "scatter_object_list", "barrier", "send",
               "recv", "isend", "irecv", "monitored_barrier"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources():
    for folder in ("x2vlm", "video"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path


def imports(tree: ast.AST, module: str) -> set:
    """Absolute names of the modules a file imports (relative imports resolved against `module`)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def layer_of(name: str) -> int | None:
    if name == "x2vlm":  # the package itself: as a module it stands on top; as an import, its submodule counts
        return len(LAYERS) - 1
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    return None


def layer_violations() -> list:
    bad = []
    for path in sources():
        module = module_name(path)
        own = layer_of(module)
        assert own is not None, f"{module} is in no layer: add it to LAYERS"
        for name in imports(ast.parse(path.read_text()), module) - {"x2vlm"}:
            theirs = layer_of(name)
            if theirs is not None and theirs > own:
                bad.append(f"{module} imports {name}")
    return bad


def test_imports_point_down_the_layers():
    assert layer_violations() == []


def test_video_stands_alone():
    p = subprocess.run([sys.executable, "-c", "import video, video.decode, video.encode, video.sampling, sys; "
                        "assert not any(m.startswith('x2vlm') for m in sys.modules), sorted(sys.modules)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_evaluation_does_not_import_the_trainer():
    for path in sorted((ROOT / "x2vlm" / "eval").rglob("*.py")):
        names = imports(ast.parse(path.read_text()), module_name(path))
        assert not {n for n in names if n.startswith(("x2vlm.train", "x2vlm.demo", "x2vlm.cli"))}, path


def collective_calls(source: str) -> list:
    """Calls of torch.distributed collectives in a source text: through any alias of torch.distributed (or a module
    below it), or imported by name; and DeepSpeed's GatheredParameters (an all-gather under ZeRO-3)."""
    tree = ast.parse(source)
    aliases, names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("torch.distributed"):
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            for a in node.names:
                if (node.module or "").startswith("torch.distributed") and a.name in COLLECTIVES:
                    names.add(a.asname or a.name)
                elif node.module == "torch" and a.name == "distributed" or \
                        (node.module or "").startswith("torch.distributed"):
                    aliases.add(a.asname or a.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in aliases | {
                "torch.distributed", "dist"}:
            found.append(ast.unparse(f))
        elif isinstance(f, ast.Name) and f.id in names:
            found.append(f.id)
        elif ast.unparse(f).endswith("GatheredParameters"):  # ZeRO-3's gathering of partitioned weights
            found.append(ast.unparse(f))
    return found


def test_the_collective_finder_finds_them():
    assert collective_calls("import torch.distributed as dist\ndist.all_reduce(t)") == ["dist.all_reduce"]
    assert collective_calls("import torch\ntorch.distributed.barrier()") == ["torch.distributed.barrier"]
    assert collective_calls("from torch.distributed import all_gather as ag\nag(a, b)") == ["ag"]
    assert collective_calls("import torch.distributed.nn.functional as F\nF.all_gather(x)") == ["F.all_gather"]
    assert collective_calls("from torch import distributed as d\nd.broadcast(t, 0)") == ["d.broadcast"]
    assert collective_calls("import torch.distributed as dist\ndist.get_rank()") == []
    assert collective_calls("import deepspeed\nwith deepspeed.zero.GatheredParameters(ps):\n    pass") == [
        "deepspeed.zero.GatheredParameters"]


@pytest.mark.parametrize("folder", ["x2vlm", "video", "scripts"])
def test_every_collective_goes_through_the_distributed_module(folder):
    allowed = ROOT / "x2vlm" / "distributed.py"
    found = {str(p.relative_to(ROOT)): calls for p in sorted((ROOT / folder).rglob("*.py"))
             if p != allowed and (calls := collective_calls(p.read_text()))}
    assert found == {}
