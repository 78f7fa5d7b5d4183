"""Image-text retrieval on a held-out pool: ITC similarity over the whole pool, then ITM re-rank of the top k.

A pool may hold several texts per visual item (COCO's five captions per image), and several items of one
instance: the ranks are by instance, as the standard COCO protocol computes them. Text -> image: the rank of the
best-ranked item of the text's instance; image -> text: the rank of the best-ranked text of the image's instance.
With one text per item and one item per instance these are the plain ranks of the true item.
"""
from __future__ import annotations

import torch

from x2vlm.eval.ranking import model_device, place_first, recall, top_pairs
from x2vlm.logs import progress


def positive_ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best-scored positive item (`positive` [Q, N] bool, at least one per row): how
    many items score strictly higher (ties count in its favour)."""
    positive = positive.to(scores.device)
    best = scores.float().masked_fill(~positive, float("-inf")).max(1, keepdim=True).values
    return (scores.float() > best).sum(1)


@torch.no_grad()
def encode_pool(model, encode_visual, n_visual: int, ids: torch.Tensor, atts: torch.Tensor, batch: int = 64):
    """Visual tokens, visual features, text tokens and text features of a pool, in batches;
    `encode_visual(i, j)` gives the vision tokens of visual items i..j-1."""
    vis, img_f, txt, txt_f = [], [], [], []
    with progress(total=n_visual + len(ids), desc="encoding the pool", unit=" items") as bar:
        for i in range(0, n_visual, batch):
            v = encode_visual(i, min(i + batch, n_visual))
            vis.append(v)
            img_f.append(model.image_feat(v).float())
            bar.update(len(v))
        for i in range(0, len(ids), batch):
            t = model.encode_text(ids[i:i + batch], atts[i:i + batch])
            txt.append(t)
            txt_f.append(model.text_feat(t).float())
            bar.update(len(t))
    return torch.cat(vis), torch.cat(img_f), torch.cat(txt), torch.cat(txt_f)


@torch.no_grad()
def itm_scorer(model, vis, txt, atts, batch: int = 128):
    """rescore(text_idx, image_idx) -> the ITM head's log-odds that the pair matches (match logit minus no-match
    logit: the order of X-VLM's match probability, on the scale of a logit)."""
    def rescore(t_idx: torch.Tensor, i_idx: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(t_idx), batch):
            t, i = t_idx[s:s + batch], i_idx[s:s + batch]
            logits = model.itm_logits(txt[t], atts[t], vis, index=i)
            out.append(logits[:, 1].float() - logits[:, 0].float())
        return torch.cat(out)
    return rescore


def itm_rerank(model, sim_t2i: torch.Tensor, k: int, score) -> dict:
    """Each query's top k by ITC re-scored and placed first, both ways: {"itm_itc": (t2i, i2t), "itm": (t2i,
    i2t)} score matrices. "itm_itc" re-scores with the sum of two logits, ITM's match log-odds (`score`, from
    itm_scorer) and ITC's similarity over the temperature, as BLIP adds its ITM score to the contrastive
    similarity; "itm" with ITM's alone, X-VLM's order. The ITM head runs once per pair."""
    itc = sim_t2i.float() / float(model.temperature())
    out = {"itm_itc": [], "itm": []}
    for sim, texts_first in ((sim_t2i, True), (sim_t2i.T, False)):
        rows, top = top_pairs(sim, k)
        q, i = rows.reshape(-1), top.reshape(-1)
        t, v = (q, i) if texts_first else (i, q)
        itm = score(t, v).to(itc.device).reshape(top.shape)
        out["itm_itc"].append(place_first(sim, rows, top, itm + itc[t, v].reshape(top.shape)))
        out["itm"].append(place_first(sim, rows, top, itm))
    return {name: tuple(pair) for name, pair in out.items()}


@torch.no_grad()
def evaluate_retrieval(model, images, ids, atts, rerank_k: int = 16, frame_mask=None, text_item=None,
                       instances=None, examples: int = 0) -> dict:
    """Texts (ids, atts [M, L]) against images [N, 3, H, W] or clips (videos [N, F, 3, H, W] with frame_mask
    [N, F]). Text t describes item text_item[t] (default: text i describes item i); items with equal `instances`
    [N] are one instance (default: each item its own). Returns R@1/5/10 and ranks both ways ("t2i"/"i2t", or
    "t2v"/"v2t" for clips), from ITC and after re-ranking the top k by ITM with ITC (itm_rerank) and by ITM
    alone (itm_only_rerank). With `examples` = n, also the first n text queries with their top 5 items by ITC
    ("examples": query, top, scores, the items that are right answers, and the 0-based rank of the best right
    answer by ITC and after the re-rank)."""
    model.eval()
    device = model_device(model)
    ids, atts = ids.to(device), atts.to(device)
    n_items = len(images)
    text_item = torch.arange(len(ids)) if text_item is None else torch.as_tensor(text_item)
    instances = torch.arange(n_items) if instances is None else torch.as_tensor(instances)
    positive = instances[text_item][:, None] == instances[None, :]  # [M, N]
    if frame_mask is None:
        names = ("t2i", "i2t")
        encode = lambda i, j: model.encode_image(images[i:j].to(device))  # noqa: E731
    else:
        names = ("t2v", "v2t")
        encode = lambda i, j: model.encode_video(images[i:j].to(device), frame_mask[i:j].to(device))  # noqa: E731
    vis, img_f, txt, txt_f = encode_pool(model, encode, len(images), ids, atts)
    sim_t2i = txt_f @ img_f.T
    score = itm_scorer(model, vis, txt, atts)

    def both(t2i: torch.Tensor, i2t: torch.Tensor) -> dict:
        out = {}
        for name, s, pos in zip(names, (t2i, i2t), (positive, positive.T)):
            for k, v in recall(positive_ranks(s, pos)).items():
                out[f"{name}_{k}"] = v
        return out

    result = both(sim_t2i, sim_t2i.T)
    result["pool_size"] = n_items
    if len(ids) != n_items:
        result["n_texts"] = len(ids)
    reranked = itm_rerank(model, sim_t2i, rerank_k, score)
    t2i_itm = reranked["itm_itc"][0]
    result["itm_rerank"] = {**both(*reranked["itm_itc"]), "k": rerank_k, "score": "itm_log_odds+itc_logit"}
    result["itm_only_rerank"] = {**both(*reranked["itm"]), "k": rerank_k, "score": "itm_log_odds"}
    if examples:
        result["examples"] = retrieval_examples(sim_t2i, t2i_itm, positive, examples)
    return result


def retrieval_examples(itc: torch.Tensor, itm: torch.Tensor, positive: torch.Tensor, n: int) -> list:
    """The first n queries of text -> item scores (ITC [Q, N] and re-ranked [Q, N]): their top 5 items by ITC."""
    q = min(n, itc.shape[0])
    top = itc[:q].float().topk(min(5, itc.shape[1]), dim=1)
    ranks = positive_ranks(itc[:q], positive[:q]).tolist()
    ranks_itm = positive_ranks(itm[:q], positive[:q]).tolist()
    return [{"query": i, "top": top.indices[i].tolist(), "scores": [round(s, 4) for s in top.values[i].tolist()],
             "answers": positive[i].nonzero()[:, 0].tolist(), "rank": ranks[i], "rank_itm": ranks_itm[i]}
            for i in range(q)]
