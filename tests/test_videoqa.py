"""Video QA: fine-tuning a pre-trained export with `x2vlm finetune --task video_qa` (one process) on clips in the
MSRVTT-QA format raises the held-in accuracy over the starting model; accuracy, accuracy by type and chance on a
hand-made example."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from video.shards import iterate_video_samples
from x2vlm.eval.run import evaluate_checkpoint, make_tokenize
from x2vlm.eval.videoqa import evaluate_videoqa
from x2vlm.model import X2VLM
from x2vlm.train.checkpoint import load_weights


def test_finetune_video_qa_improves_accuracy(video_finetuning):
    v = video_finetuning
    cfg = v.config("ft_qa", f"{{name: qa, kind: video_qa, shards: [{','.join(v.qa)}], batch_size: 8, max_frames: 4}}",
                   f"model.qa_answers={v.answers}", "train.steps=60", "train.save_every=60")
    v.finetune("video_qa", "ft_qa")
    after = evaluate_checkpoint(str(v.root / "ft_qa"), videoqa_shards=v.qa, max_frames=4)["video_qa"]
    assert after["n"] == sum(len(c["qa"]) for c in v.clips) and set(after["by_type"]) >= {"colour", "direction"}
    # before: the pre-trained weights with a fresh answer head, as the fine-tuning began
    torch.manual_seed(1)
    start = X2VLM(cfg.model, cfg.loss, len(v.tokenizer), v.tokenizer.pad_token_id)
    load_weights(start, v.root / "pre")
    before = evaluate_videoqa(start, iterate_video_samples(v.qa, max_frames=4), make_tokenize(v.tokenizer, 40), 64)
    assert before["n"] == after["n"]
    assert after["acc"] > before["acc"] + 0.1 and after["acc"] > 2 / v.answers, (before, after)  # 2x uniform


class TableModel(torch.nn.Module):
    """Answers the questions it is asked, in order, with the labels of a table."""

    def __init__(self, answers: list, n_answers: int):
        super().__init__()
        self.answers, self.cfg = iter(answers), SimpleNamespace(qa_answers=n_answers)

    def qa_logits(self, batch: dict) -> torch.Tensor:
        labels = torch.tensor([next(self.answers) for _ in range(len(batch["text_ids"]))])
        return torch.nn.functional.one_hot(labels, self.cfg.qa_answers).float()


def test_accuracy_by_type_and_chance_by_hand():
    def clip(*qa):
        return {"frames": np.zeros((2, 8, 8, 3), np.uint8),
                "json": {"qa": [{"question": f"q{i}", "type": t, "label": label} for i, (t, label) in enumerate(qa)]}}

    clips = [clip(("colour", 0), ("direction", 2)),
             clip(("colour", 1), ("direction", 2), ("colour", -1)),  # the last answer is outside the vocabulary
             clip(("direction", 3))]
    predicted = [0, 2, 1, 3, 1, 3]  # right, right; right, wrong, wrong (never right); right

    def tokenize(texts):
        return torch.ones(len(texts), 3, dtype=torch.long), torch.ones(len(texts), 3, dtype=torch.long)

    r = evaluate_videoqa(TableModel(predicted, 4), clips, tokenize, 8, batch=2)
    assert r["acc"] == pytest.approx(4 / 6) and r["n"] == 6 and r["clips"] == 3 and r["outside_vocab"] == 1
    assert r["by_type"]["colour"]["acc"] == pytest.approx(2 / 3)
    assert r["by_type"]["direction"]["acc"] == pytest.approx(2 / 3)
    # chance: the most frequent answer of each type (colour: 0 or 1, once; direction: 2, twice) for every question
    assert r["chance"] == pytest.approx(3 / 6)
    assert r["by_type"]["colour"]["chance"] == pytest.approx(1 / 3)
    assert r["by_type"]["direction"]["chance"] == pytest.approx(2 / 3)
    assert r["majority"] == pytest.approx(2 / 6)  # always label 2
