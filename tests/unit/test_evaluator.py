"""Held-out evaluation during training (x2vlm.train.evaluator) in a world of one: it runs at fixed steps (the same
for a resumed run), evaluates a copy of the live weights exactly as the evaluation code does the model itself, and
leaves every global random generator as it found it."""
import random

import numpy as np
import pytest
import torch

from x2vlm.config import load_config, update
from x2vlm.data.samples import write_shards
from x2vlm.data.tokenizer import load_tokenizer, train_tokenizer
from x2vlm.demo.shapesworld import corpus, generate
from x2vlm.eval.retrieval import evaluate_retrieval
from x2vlm.eval.run import load_captioned_pool, make_tokenize
from x2vlm.pretrained import build_model
from x2vlm.train.evaluator import Evaluator


def test_steps_weights_and_random_generators(tmp_path):
    samples = generate("heldout", 6, seed=3, image_size=64)
    shards = write_shards(samples, str(tmp_path), "heldout", 6)
    train_tokenizer(corpus(samples), str(tmp_path / "tok"))
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    cfg = update(load_config("tiny"), {"train.out_dir": str(tmp_path / "run"), "train.eval_every": 3,
                                       "train.eval.images": shards, "train.eval.regions": shards,
                                       "train.eval.rerank_k": 3, "train.eval.examples": 2,
                                       "model.text.tokenizer": str(tmp_path / "tok")})
    evaluator = Evaluator(cfg, tokenizer, torch.device("cpu"), final_step=8)
    assert [s for s in range(11) if evaluator.due(s)] == [0, 3, 6, 8, 9]

    torch.manual_seed(5)
    live = build_model(cfg, tokenizer).train()
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    record = evaluator.run(live, 6)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert live.training  # the live model is left as it was

    images, captions, instances, _ = load_captioned_pool(shards, 64)
    ids, atts = make_tokenize(tokenizer, 40)([c for caps in captions for c in caps])
    direct = evaluate_retrieval(live.eval(), images, ids, atts, 3, instances=instances)
    got = {k: v for k, v in record["image_retrieval"].items() if k not in ("examples", "protocol")}
    assert got == direct
    assert record["image_retrieval"]["protocol"]["weights"] == "live, step 6"
    assert record["grounding"]["n"] > 0 and len(record["grounding"]["examples"]) == 2
    assert all((tmp_path / "run" / e["file"]).exists() for e in record["grounding"]["examples"])
    # a trained model whose tensors are not the evaluation model's (another shape of model) is refused, never
    # evaluated half-copied
    other = build_model(update(cfg, {"model.fusion.layers": 1}), tokenizer)
    with pytest.raises(RuntimeError, match=r"differ in \d+ tensor name"):
        evaluator.run(other, 9)
