"""Token importance as text: display pieces, words, the highest-weight token table; on a byte table and on the
real SmolLM2 tokenizer (byte-level BPE) when it is cached."""

from __future__ import annotations

import pytest

from evaluation.importance import heatmap_side, token_pieces, top_weight_tokens, word_spans

# a toy byte-level vocabulary: "é" and the curly quote are split over two and three byte tokens
TABLE = {1: b"a", 2: b"\xc3", 3: b"\xa9", 4: b"!", 5: b" b", 6: b" \xe2", 7: b"\x80", 8: b"\x9c", 9: b"c", 10: b"\n"}


def decode(ids):
    return b"".join(TABLE[i] for i in ids).decode("utf-8", errors="replace")


def test_token_pieces_concatenate_to_the_text():
    """Byte tokens of "é" (2 bytes): the first piece is empty, the second carries the character."""
    assert token_pieces(decode, [1, 2, 3, 4]) == ["a", "", "\u00e9", "!"]
    ids = [1, 2, 3, 5, 6, 7, 8, 9, 10, 1]
    assert "".join(token_pieces(decode, ids)) == decode(ids) == "a\u00e9 b \u201cc\na"


def test_word_spans_whitespace_bytes_special_and_newlines():
    """Pieces of "aé b “c↵a<eos>": the empty byte piece joins the word its character completes (the quote's two
    empty pieces start the word ' “c'), a newline ends a word, a special token is a word of its own."""
    pieces = token_pieces(decode, [1, 2, 3, 5, 6, 7, 8, 9, 10, 1]) + ["<eos>"]
    assert pieces == ["a", "", "\u00e9", " b", "", "", " \u201c", "c", "\n", "a", "<eos>"]
    spans = word_spans(pieces, special={10})
    assert spans == [(0, 3), (3, 4), (4, 8), (8, 9), (9, 10), (10, 11)]
    assert ["".join(pieces[a:b]) for a, b in spans] == ["a\u00e9", " b", " \u201cc", "\n", "a", "<eos>"]
    assert word_spans(pieces) == [(0, 3), (3, 4), (4, 8), (8, 9), (9, 11)]  # without the special mark: "a<eos>"
    assert word_spans(["x", ""]) == [(0, 1), (1, 2)]  # trailing incomplete bytes: a word of their own


def test_top_weight_tokens_mean_normalised_weight():
    """Two responses, weights normalised by their response mean:
    r1 = [7, 8, 7] weights [1, 2, 3], mean 2 -> 7: 0.5, 1.5; 8: 1.0
    r2 = [7, 9] weights [4, 0], mean 2 -> 7: 2.0; 9: 0.0
    token 7: (0.5 + 1.5 + 2.0) / 3 = 4/3 (count 3); 8: 1.0 (1); 9: 0.0 (1). r3 (all zero) cannot be normalised."""
    rec = top_weight_tokens([[7, 8, 7], [7, 9], [8]], [[1, 2, 3], [4, 0], [0]], str, k=2, min_count=1)
    assert rec["responses"] == 2 and rec["skipped"] == 1 and rec["min_count"] == 1
    assert [(r["id"], r["count"]) for r in rec["tokens"]] == [(7, 3), (8, 1)]
    assert rec["tokens"][0]["mean_weight"] == pytest.approx(4 / 3) and rec["tokens"][1]["mean_weight"] == 1.0
    assert rec["tokens"][0]["token"] == "[7]"  # decode([id])
    assert [r["id"] for r in top_weight_tokens([[7, 8, 7], [7, 9]], [[1, 2, 3], [4, 0]], str)["tokens"]] == [7]
    with pytest.raises(ValueError, match="2 tokens but 1 weights"):
        top_weight_tokens([[7, 8]], [[1.0]], str)


def test_heatmap_side_marks_special_tokens():
    side = heatmap_side(decode, [1, 2, 3, 4], [0.5, 1.0, 1.5, 1.0], special_ids={4})
    assert side == {"tokens": ["a", "", "\u00e9", "!"], "weights": [0.5, 1.0, 1.5, 1.0], "special": [3]}


def test_words_of_the_real_smollm2_tokenizer():
    """SmolLM2's byte-level BPE ("Ġ" = space, multi-byte characters over several tokens): the pieces join to the
    text, and the words are the text's whitespace-separated words (plus the newline and the special token)."""
    from pipeline.model_store import registry_dir

    folder = registry_dir("smollm2-135m-instruct")
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 is not cached in {folder} (`tidpo models fetch smollm2-135m-instruct`)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    text = "Let\u2019s see: “caf\u00e9” \U0001f600 grandmothers\n\nOk"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert "Ġsee" in tok.convert_ids_to_tokens(ids)  # byte-level tokens ("Ġ" = space), not text
    alone = [tok.decode([t]) for t in ids]
    assert any(t.endswith("\ufffd") for t in alone)  # the emoji's bytes span two tokens: each alone is U+FFFD
    pieces = token_pieces(lambda x: tok.decode(x, skip_special_tokens=False), ids)
    assert "".join(pieces) == text + "<|im_end|>" and " \U0001f600" in pieces
    special = {i for i, t in enumerate(ids) if t in set(tok.all_special_ids)}
    words = ["".join(pieces[a:b]) for a, b in word_spans(pieces, special)]
    assert [w.strip() for w in words if w.strip()] == text.split() + ["<|im_end|>"]
