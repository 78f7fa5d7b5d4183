"""Masked-language-model masking, X2-VLM's recipe: whole words, sometimes a 2-3 token span, 80/10/10.

Per text, n = min(max_masks, max(1, round(real tokens * mlm_prob))) tokens are chosen by whole words in random
order; with probability span_prob a chosen word grows over the following words into a span of 2-3 tokens. A
word (or span) that would overshoot n is passed over; if no word fits, the shortest word is taken (at most
max_masks of its tokens). Special tokens and padding are never chosen. Of the chosen tokens 80% become [MASK],
10% a random non-special token and 10% stay as they are.
"""
from __future__ import annotations

import torch


def _words(ids, atts, word_ids, special: set) -> list:
    """Positions of the real tokens grouped into words: runs of consecutive tokens with one word id."""
    words, last = [], None
    for i, w in enumerate(word_ids):
        if w is None or not atts[i] or ids[i] in special:
            last = None
            continue
        if last is not None and w == last and words[-1][-1] == i - 1:
            words[-1].append(i)
        else:
            words.append([i])
        last = w
    return words


def _choose(words: list, budget: int, max_masks: int, span_prob: float, gen: torch.Generator) -> list:
    chosen: set = set()
    for w in torch.randperm(len(words), generator=gen).tolist():
        span_coin = float(torch.rand((), generator=gen))
        span_len = int(torch.randint(2, 4, (), generator=gen))
        if len(chosen) >= budget:
            break
        group = list(words[w])
        if span_coin < span_prob:
            j = w + 1
            while len(group) < span_len and j < len(words) and words[j][0] == group[-1] + 1:
                group.extend(words[j])
                j += 1
        new = [i for i in group if i not in chosen]
        if len(chosen) + len(new) > budget:
            new = [i for i in words[w] if i not in chosen]  # without the span
        if len(chosen) + len(new) <= budget:
            chosen.update(new)
    if not chosen and words:
        chosen.update(min(words, key=len)[:max_masks])
    return sorted(chosen)


def mask_tokens(ids: torch.Tensor, atts: torch.Tensor, word_ids: list, mask_id: int, special_ids, vocab_size: int,
                mlm_prob: float = 0.5, max_masks: int = 12, span_prob: float = 0.2,
                generator: torch.Generator | None = None):
    """ids, atts [M, L]; word_ids: per text the word index of each token (None for special tokens), as the
    fast tokenizer's word_ids() gives. Returns (masked ids, labels): labels hold the original id where a token
    was chosen and -100 elsewhere."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    special = {int(i) for i in special_ids if i is not None}
    allowed = torch.tensor([i for i in range(vocab_size) if i not in special])
    masked, labels = ids.clone(), torch.full_like(ids, -100)
    for m in range(ids.shape[0]):
        words = _words(ids[m].tolist(), atts[m].tolist(), word_ids[m], special)
        n_real = sum(len(w) for w in words)
        if not n_real:
            continue
        budget = min(max_masks, max(1, round(n_real * mlm_prob)))
        idx = torch.tensor(_choose(words, budget, max_masks, span_prob, gen), dtype=torch.long)
        orig = ids[m, idx]
        labels[m, idx] = orig
        roll = torch.rand(len(idx), generator=gen)
        rand_tok = allowed[torch.randint(0, len(allowed), (len(idx),), generator=gen)].to(ids.dtype)
        masked[m, idx] = torch.where(roll < 0.8, torch.full_like(orig, mask_id),
                                     torch.where(roll < 0.9, rand_tok, orig))
    return masked, labels


def mask_batch(tokenizer, enc, mlm_prob: float, max_masks: int, span_prob: float, generator: torch.Generator):
    """mask_tokens for the output of a fast tokenizer called with return_tensors="pt"."""
    ids, atts = enc["input_ids"], enc["attention_mask"]
    word_ids = [enc.word_ids(i) for i in range(ids.shape[0])]
    return mask_tokens(ids, atts, word_ids, tokenizer.mask_token_id, tokenizer.all_special_ids, len(tokenizer),
                       mlm_prob, max_masks, span_prob, generator)
