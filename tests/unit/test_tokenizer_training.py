"""The WordPiece tokenizer that the demo trains on its own texts: the same vocabulary in every process."""
import json
import os
import subprocess
import sys

from x2vlm.data.tokenizer import SPECIALS, train_tokenizer, wordpiece_vocab

TEXTS = ["the red circle moves to the left", "a blue square stays still", "the green diamond moves right",
         "a red square then a blue circle", "the circle turns from red to green"] * 3


def test_merges_follow_counts_and_ties_go_to_the_pair_that_sorts_first():
    vocab = wordpiece_vocab({"cd": 3, "ab": 1, "ef": 1}, vocab_size=100)
    tokens = sorted(vocab, key=vocab.get)
    assert tokens[:len(SPECIALS)] == SPECIALS
    assert tokens[len(SPECIALS):] == ["##b", "##d", "##f", "a", "c", "e", "cd", "ab", "ef"]
    assert list(wordpiece_vocab({"cd": 3, "ab": 1, "ef": 1}, vocab_size=len(SPECIALS) + 7)) == tokens[:-2]


def test_merges_inside_words_keep_the_continuation_prefix():
    vocab = wordpiece_vocab({"abab": 2, "xab": 1}, vocab_size=100)
    assert "##ab" in vocab and "abab" in vocab and "xab" in vocab


def test_corpus_words_are_whole_tokens_and_texts_round_trip(tmp_path):
    tok = train_tokenizer(TEXTS, str(tmp_path / "tok"))
    for text in set(TEXTS):
        assert tok.tokenize(text) == text.split()
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert tok.pad_token_id == 0 and "[UNK]" not in tok.tokenize("the circle moves")
    assert tok.tokenize("circles greener") == ["circle", "##s", "green", "##e", "##r"]  # unseen words: pieces


def test_same_vocabulary_in_every_process(tmp_path):
    """Python's string hashing differs between processes unless fixed; the vocabulary must not."""
    code = ("import sys, json; from x2vlm.data.tokenizer import train_tokenizer; "
            "tok = train_tokenizer(json.loads(sys.argv[1]), sys.argv[2]); "
            "print(json.dumps(tok.get_vocab(), sort_keys=True))")
    vocabs = []
    for seed in ("1", "2", "3"):
        out = subprocess.run([sys.executable, "-c", code, json.dumps(TEXTS), str(tmp_path / seed)], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed})
        vocabs.append(out.stdout.strip().splitlines()[-1])
        assert (tmp_path / seed / "tokenizer.json").read_bytes() == (tmp_path / "1" / "tokenizer.json").read_bytes()
    assert vocabs[0] == vocabs[1] == vocabs[2]
