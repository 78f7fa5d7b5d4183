"""Image-text retrieval on a held-out pool: ITC similarity over the whole pool, then ITM re-rank of the top k."""
from __future__ import annotations

import torch

from x2vlm.eval.ranking import gt_ranks, recall, rerank_scores


@torch.no_grad()
def encode_pool(model, encode_visual, n_visual: int, ids: torch.Tensor, atts: torch.Tensor, batch: int = 64):
    """Visual tokens, visual features, text tokens and text features of a pool, in batches;
    `encode_visual(i, j)` gives the vision tokens of visual items i..j-1."""
    vis, img_f, txt, txt_f = [], [], [], []
    for i in range(0, n_visual, batch):
        v = encode_visual(i, min(i + batch, n_visual))
        vis.append(v)
        img_f.append(model.image_feat(v).float())
    for i in range(0, len(ids), batch):
        t = model.encode_text(ids[i:i + batch], atts[i:i + batch])
        txt.append(t)
        txt_f.append(model.text_feat(t).float())
    return torch.cat(vis), torch.cat(img_f), torch.cat(txt), torch.cat(txt_f)


@torch.no_grad()
def itm_scorer(model, vis, txt, atts, batch: int = 128):
    """rescore(text_idx, image_idx) -> probability that the pair matches, from the ITM head."""
    def rescore(t_idx: torch.Tensor, i_idx: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(t_idx), batch):
            t, i = t_idx[s:s + batch], i_idx[s:s + batch]
            logits = model.itm_logits(txt[t], atts[t], vis, index=i)
            out.append(logits.float().softmax(-1)[:, 1])
        return torch.cat(out)
    return rescore


@torch.no_grad()
def evaluate_retrieval(model, images, ids, atts, rerank_k: int = 16, frame_mask=None) -> dict:
    """Text i describes image i (images [N, 3, H, W]) or clip i (videos [N, F, 3, H, W] with frame_mask
    [N, F]). Returns R@1/5/10 and ranks both ways ("t2i"/"i2t", or "t2v"/"v2t" for clips), from ITC and after
    ITM re-ranking of the top k."""
    model.eval()
    if frame_mask is None:
        names = ("t2i", "i2t")
        encode = lambda i, j: model.encode_image(images[i:j])  # noqa: E731
    else:
        names = ("t2v", "v2t")
        encode = lambda i, j: model.encode_video(images[i:j], frame_mask[i:j])  # noqa: E731
    vis, img_f, txt, txt_f = encode_pool(model, encode, len(images), ids, atts)
    sim_t2i = txt_f @ img_f.T
    gt = torch.arange(len(ids))
    score = itm_scorer(model, vis, txt, atts)

    def both(t2i: torch.Tensor, i2t: torch.Tensor) -> dict:
        out = {}
        for name, s in zip(names, (t2i, i2t)):
            for k, v in recall(gt_ranks(s, gt)).items():
                out[f"{name}_{k}"] = v
        return out

    result = both(sim_t2i, sim_t2i.T)
    result["pool_size"] = len(ids)
    reranked = both(rerank_scores(sim_t2i, rerank_k, score),
                    rerank_scores(sim_t2i.T, rerank_k, lambda i, t: score(t, i)))
    result["itm_rerank"] = {**reranked, "k": rerank_k}
    return result
