"""Masked-language-model masking, X2-VLM's recipe: whole words, sometimes a 2-3 token span, 80/10/10."""
from __future__ import annotations

import torch


def mask_tokens(ids: torch.Tensor, word_ids: list, special_ids, mask_id: int, vocab_size: int,
                mlm_prob: float, max_masks: int, span_prob: float, gen: torch.Generator):
    """ids [M, L]; word_ids: per text the word index of each token (None for specials and padding).
    Per text n = min(max_masks, max(1, round(tokens * mlm_prob))) tokens are chosen by whole words (a chosen word
    grows into a span of 2-3 tokens with probability span_prob); of those 80% become [MASK], 10% a random
    token, 10% stay. Returns (masked ids, labels with -100 where nothing was chosen)."""
    masked, labels = ids.clone(), torch.full_like(ids, -100)
    special = torch.tensor(sorted(set(special_ids)))
    for m in range(ids.shape[0]):
        wid = word_ids[m]
        positions = [i for i, w in enumerate(wid) if w is not None]
        if not positions:
            continue
        budget = min(max_masks, max(1, round(len(positions) * mlm_prob)))
        words: dict = {}
        for i in positions:
            words.setdefault(wid[i], []).append(i)
        chosen: list = []
        for w in torch.randperm(len(words), generator=gen).tolist():
            if len(chosen) >= budget:
                break
            group = list(words[list(words)[w]])
            if torch.rand((), generator=gen) < span_prob:
                span = int(torch.randint(2, 4, (), generator=gen))
                nxt = group[-1] + 1
                while len(group) < span and nxt < len(wid) and wid[nxt] is not None:
                    group.append(nxt)
                    nxt += 1
            group = [i for i in group if i not in chosen]
            if len(chosen) + len(group) > budget:
                continue  # a whole word or nothing
            chosen.extend(group)
        if not chosen:  # every word was longer than the budget: mask the start of the first one
            chosen = words[list(words)[0]][:budget]
        idx = torch.tensor(chosen)
        labels[m, idx] = ids[m, idx]
        roll = torch.rand(len(chosen), generator=gen)
        rand_tok = torch.randint(0, vocab_size, (len(chosen),), generator=gen)
        while True:  # random replacements are never special tokens
            bad = torch.isin(rand_tok, special)
            if not bad.any():
                break
            rand_tok[bad] = torch.randint(0, vocab_size, (int(bad.sum()),), generator=gen)
        new = torch.where(roll < 0.8, torch.full_like(rand_tok, mask_id),
                          torch.where(roll < 0.9, rand_tok, ids[m, idx]))
        masked[m, idx] = new
    return masked, labels
