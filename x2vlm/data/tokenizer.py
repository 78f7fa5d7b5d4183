"""Tokenizers: train a small BERT-style WordPiece tokenizer on a corpus, load one from a folder or hub id, and
tokenise a batch of texts the one way the project does."""
from __future__ import annotations

import os
import socket
from collections import Counter
from urllib.parse import urlparse

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts, out_dir: str, vocab_size: int = 1000):
    """A lower-casing WordPiece tokenizer trained on `texts`, saved with save_pretrained to `out_dir` and
    returned as a transformers fast tokenizer ([PAD] = 0). The same texts give the same vocabulary, ids
    included, in every process (see wordpiece_vocab)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t)))
    tok = Tokenizer(models.WordPiece(wordpiece_vocab(words, vocab_size), unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(out_dir)
    return fast


def wordpiece_vocab(word_counts: dict, vocab_size: int) -> dict:
    """{token: id} learned from {word: count} as WordPiece trainers do (byte-pair merges over the words spelt
    as "c", "##c", ...; every merge adds a token): the special tokens, then the characters, then merges of the
    most frequent adjacent pair until `vocab_size` tokens or no pair is left. Ties go to the pair that sorts
    first, so the result depends on the counts alone. (The `tokenizers` trainer breaks ties by ids it hands out
    in hash-map order, and gives the same texts another vocabulary from one process to the next.) Meant for
    small corpora: each merge recounts every pair."""
    words = [([w[0]] + ["##" + c for c in w[1:]], n) for w, n in sorted(word_counts.items()) if w]
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for sym in sorted({s for spelt, _ in words for s in spelt}):
        vocab.setdefault(sym, len(vocab))
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for spelt, n in words:
            for pair in zip(spelt, spelt[1:]):
                pairs[pair] += n
        if not pairs:
            break
        a, b = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merged = a + b[2:]
        vocab.setdefault(merged, len(vocab))
        for spelt, _ in words:
            i = 0
            while i < len(spelt) - 1:
                if spelt[i] == a and spelt[i + 1] == b:
                    spelt[i:i + 2] = [merged]
                i += 1
    return vocab


def _hub_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_tokenizer(name_or_dir: str):
    """A fast tokenizer from a local folder, the local hub cache, or the hub. Fails at once with a clear error
    when the folder does not exist or the hub cannot be reached."""
    from transformers import AutoTokenizer

    if os.path.isdir(name_or_dir):
        tok = AutoTokenizer.from_pretrained(name_or_dir)
    else:
        looks_local = name_or_dir.startswith((".", "/", "~")) or name_or_dir.count("/") > 1
        if looks_local:
            raise FileNotFoundError(f"tokenizer folder not found: {name_or_dir}")
        try:
            tok = AutoTokenizer.from_pretrained(name_or_dir, local_files_only=True)
        except (OSError, ValueError):
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or not _hub_reachable()
            if offline:
                raise OSError(f"tokenizer {name_or_dir!r}: not a local folder, not in the hub cache, and the hub "
                              f"is unreachable; pass a local tokenizer folder") from None
            tok = AutoTokenizer.from_pretrained(name_or_dir)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer {name_or_dir!r}: a fast tokenizer is needed (word ids for whole-word masking)")
    return tok


def tokenize(tokenizer, texts, max_len: int):
    """A batch of texts -> the tokenizer's output with int64 "input_ids" and "attention_mask" [M, L], padded to
    the longest text and cut at `max_len` tokens (word ids stay available for whole-word masking)."""
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    enc["input_ids"], enc["attention_mask"] = enc["input_ids"].long(), enc["attention_mask"].long()
    return enc
