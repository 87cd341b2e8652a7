"""hybrid_lm.train.data: corpus, splits, local and Hub sources, tokenizer, packing. CPU, no network."""
import collections
import itertools
import json
import math
import time
import warnings

import pytest
import torch
from transformers import AutoTokenizer

from hybrid_lm.train import data as D

EXCLUDED = {"site-packages", "dist-packages", "test", "tests", "idle_test"}


@pytest.fixture(scope="module")
def tokenizer():
    # A small vocabulary on ~300k characters of the stdlib: well under a second.
    return D.train_tokenizer(D.load_documents(None, "train"), 512, max_chars=300_000)


# ---- embedded corpus -------------------------------------------------------------------------

def test_stdlib_files_found_sorted_and_filtered():
    files = D.stdlib_files()
    root = D._stdlib_root()
    assert len(files) > 300 and files == sorted(files) == D.stdlib_files()
    assert all(f.suffix == ".py" for f in files)
    assert not any(EXCLUDED & set(f.relative_to(root).parts[:-1]) for f in files)
    rel = {f.relative_to(root).as_posix() for f in files}
    assert {"os.py", "json/__init__.py", "asyncio/events.py"} <= rel
    assert not any(r.startswith("test/") for r in rel)


def test_embedded_split_is_a_deterministic_partition_by_file():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stdlib is UTF-8 text: not one replaced byte to warn about
        train, val = D.load_documents(None, "train"), D.load_documents(None, "val")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in D.stdlib_files()]
    # Every file lands on exactly one side (Counter: many __init__.py files share a text).
    assert collections.Counter(train) + collections.Counter(val) == collections.Counter(texts)
    assert 0.005 < len(val) / len(texts) < 0.05
    assert D.load_documents(None, "val") == val
    with pytest.raises(ValueError, match="split"):
        D.load_documents(None, "validation")


# ---- local files -----------------------------------------------------------------------------

def _texts(n):
    return [f"document {i}: caf\u00e9 \u4e2d\u6587 \U0001f600\n" + "x = 1\n" * (i % 7) for i in range(n)]


def _check_partition(source, texts):
    train, val = D.load_documents(str(source), "train"), D.load_documents(str(source), "val")
    assert val and sorted(train + val) == sorted(texts)
    assert D.load_documents(str(source), "train") == train


def test_local_txt_folder(tmp_path):
    texts = _texts(200)
    for i, t in enumerate(texts):
        (tmp_path / "sub" if i % 2 else tmp_path).mkdir(exist_ok=True)
        ((tmp_path / "sub" if i % 2 else tmp_path) / f"{i:03d}.txt").write_text(t, encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored")
    _check_partition(tmp_path, texts)


def test_local_txt_invalid_utf8_is_replaced(tmp_path):
    docs = [f"doc {i}".encode() + (b"\xff\xfe" if i == 0 else b"") for i in range(200)]
    for i, d in enumerate(docs):
        (tmp_path / f"{i:03d}.txt").write_bytes(d)
    with pytest.warns(UserWarning, match=r"000\.txt: 2 invalid UTF-8 sequence\(s\), the first at byte 5") as caught:
        everything = D.load_documents(str(tmp_path), "train") + D.load_documents(str(tmp_path), "val")
    assert "doc 0\ufffd\ufffd" in everything
    assert all("000.txt" in str(w.message) for w in caught)  # only the file with stray bytes


def test_binary_or_non_utf8_files_are_refused_by_name(tmp_path):
    for i in range(100):
        (tmp_path / f"{i:03d}.txt").write_text(f"doc {i}")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(ValueError, match=r"image\.txt: a binary file, not text \(NUL byte at offset 8\)"):
        D.load_documents(str(tmp_path), "train")
    (tmp_path / "image.txt").unlink()
    latin1 = "d\u00e9j\u00e0 vu, caf\u00e9, na\u00efve, \u00e9t\u00e9\n" * 5  # 6 accented letters a line
    (tmp_path / "latin1.txt").write_bytes(latin1.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 text \(30 invalid sequences in 130 bytes, "
                                         r"the first at byte 1\)"):
        D.load_documents(str(tmp_path), "val")
    (tmp_path / "data.jsonl").write_bytes(b'{"text": "ok"}\n\x00\x00')
    (tmp_path / "latin1.txt").unlink()
    with pytest.raises(ValueError, match=r"data\.jsonl: a binary file"):
        D.load_documents(str(tmp_path / "data.jsonl"), "train")


def test_local_jsonl_file(tmp_path):
    texts = _texts(300)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n\n")
    _check_partition(path, texts)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        D.load_documents(str(tmp_path / "bad.jsonl"), "train")


def test_invalid_jsonl_line_names_the_file_and_line(tmp_path):
    # the line number counts blank lines too; json's own counts lines within the string it was given
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n  {"text": "unterminated}\n{"text": "after"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON \(Unterminated string .* column 12\)") as e:
        D.load_documents(str(tmp_path / "bad.jsonl"), "train")
    assert type(e.value) is ValueError and isinstance(e.value.__cause__, json.JSONDecodeError)


def test_one_txt_file_is_split_into_paragraphs_or_lines(tmp_path):
    """One .txt file is one document, on one side of the split: its paragraphs (or, with no blank
    lines, its lines) are split instead, the same way by both calls."""
    paragraphs = [f"paragraph {i}\n    indented line {i}" for i in range(300)]
    separators = ["\n\n", "\n  \t\n\n", "\r\n\r\n"]
    text = "\n\n" + "".join(p + separators[i % 3] for i, p in enumerate(paragraphs))
    (tmp_path / "book.txt").write_text(text, newline="")
    _check_partition(tmp_path / "book.txt", paragraphs)
    lines = [f"line {i}" for i in range(300)]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    _check_partition(tmp_path / "lines.txt", lines)
    # documents on both sides are never split up: a folder of files splits by file, as before
    (tmp_path / "book.txt").unlink()
    (tmp_path / "lines.txt").write_text("\n\n".join(lines))
    for i, p in enumerate(paragraphs):
        (tmp_path / f"{i:03d}.txt").write_text(p)
    _check_partition(tmp_path, paragraphs + ["\n\n".join(lines)])


def test_too_little_text_is_refused_with_the_reason(tmp_path):
    (tmp_path / "one.txt").write_text("a single line can only be on one side of the split")
    for split in ("train", "val"):
        with pytest.raises(ValueError, match=r"one\.txt: too little text .* it holds 1 document\(s\) of 1 "
                                             r"non-blank line\(s\), and one in 50, chosen by a hash .* split empty; "
                                             r"give more text .* or more files"):
            D.load_documents(str(tmp_path / "one.txt"), split)


def test_local_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet support needs pyarrow")
    import pyarrow.parquet as pq

    texts = _texts(300)
    pq.write_table(pa.table({"text": texts, "n": list(range(300))}), tmp_path / "data.parquet")
    _check_partition(tmp_path / "data.parquet", texts)
    pq.write_table(pa.table({"body": texts}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        D.load_documents(str(tmp_path / "other.parquet"), "train")


def test_missing_or_unusable_paths(tmp_path):
    for missing in ["/no/such/dir", "./no_such_dir", "no_such_file.jsonl", str(tmp_path / "x.txt")]:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            D.load_documents(missing, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt"):
        D.load_documents(str(tmp_path / "empty"), "train")
    (tmp_path / "a.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        D.load_documents(str(tmp_path / "a.csv"), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_tokenizer(str(tmp_path / "no_tokenizer_here"))


# ---- Hub names fail fast ---------------------------------------------------------------------

def _fails_fast(fn, *args):
    start = time.monotonic()
    with pytest.raises((ValueError, ConnectionError)) as info:
        fn(*args)
    assert time.monotonic() - start < 8
    return str(info.value)


def test_unreachable_hub_names_fail_fast_offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert "no-such-org/no-such-dataset" in _fails_fast(D.load_documents, "no-such-org/no-such-dataset", "train")
    assert "no-such-org/no-such-tokenizer" in _fails_fast(D.load_tokenizer, "no-such-org/no-such-tokenizer")


def test_unreachable_hub_names_fail_fast_online(monkeypatch):
    # Whether or not this machine reaches the Hub: a missing repo or no connection, never a hang.
    monkeypatch.setattr(D, "HUB_TIMEOUT_S", 2.0)
    assert "hybrid-lm-no-such-org/x" in _fails_fast(D.load_documents, "hybrid-lm-no-such-org/x:cfg", "val")
    assert "hybrid-lm-no-such-org/y" in _fails_fast(D.load_tokenizer, "hybrid-lm-no-such-org/y")


# ---- tokenizer -------------------------------------------------------------------------------

ROUND_TRIP = [
    "def f(x):\n\treturn x  # done\r\n",
    "caf\u00e9 na\u0308ive \u4e2d\u6587 \u0645\u0631\u062d\u0628\u0627 \U0001f600\U0001f468\u200d\U0001f469 \x00\x7f",
    "   leading and trailing spaces   ",
    "",
    "a <|endoftext|> inside",
]


def test_tokenizer_trains_round_trips_and_reloads(tokenizer, tmp_path):
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == D.EOT
    for text in ROUND_TRIP + D.load_documents(None, "val")[:3]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    for reloaded in (AutoTokenizer.from_pretrained(tmp_path), D.load_tokenizer(str(tmp_path))):
        assert reloaded.eos_token_id == tokenizer.eos_token_id and len(reloaded) == 512
        for text in ROUND_TRIP:
            ids = reloaded.encode(text, add_special_tokens=False)
            assert ids == tokenizer.encode(text, add_special_tokens=False) and reloaded.decode(ids) == text
    with pytest.raises(ValueError, match="vocab_size"):
        D.train_tokenizer(["abc"], 256)


def test_token_bytes_and_bits_per_byte(tokenizer):
    lengths = D.token_byte_lengths(tokenizer)
    assert lengths.shape == (len(tokenizer),) and lengths[tokenizer.eos_token_id] == 0
    for text in ROUND_TRIP[:3]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert lengths[ids].sum().item() == len(text.encode("utf-8"))
    assert D.bits_per_byte(100 * math.log(2), 50) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        D.bits_per_byte(1.0, 0)


# ---- packing ---------------------------------------------------------------------------------

DOCS = [f"doc {i} " + "word " * (i * 5 % 11) + "\u00e9" * (i % 3) for i in range(40)]


def _stream(tokenizer, docs):
    """The unshuffled token stream, built independently of PackedRows."""
    tokens = []
    for d in docs:
        tokens += tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]
    return tokens


def _take(rows, n):
    return [(t.tolist(), c.tolist()) for t, c in (next(rows) for _ in range(n))]


def test_rows_match_the_stream_with_boundaries(tokenizer):
    T = 16
    stream = _stream(tokenizer, DOCS)
    ends = set(itertools.accumulate(len(tokenizer.encode(d, add_special_tokens=False)) + 1 for d in DOCS))
    rows = list(D.PackedRows(DOCS, tokenizer, T, shuffle=False, repeat=False))
    assert len(rows) == (len(stream) - 1) // T
    for g, (tokens, cu) in enumerate(rows):
        assert tokens.dtype == torch.int64 and cu.dtype == torch.int32
        assert tokens.tolist() == stream[g * T:g * T + T + 1]
        # A segment starts at 0 and after every document end that falls among the inputs.
        expected = [0] + sorted(e - g * T for e in ends if 0 < e - g * T < T) + [T]
        assert cu.tolist() == expected
        eos_at = [j + 1 for j in range(T - 1) if tokens[j] == tokenizer.eos_token_id]
        assert cu.tolist() == [0] + eos_at + [T]


def test_batch_targets_are_shifted_inputs(tokenizer):
    rows = D.PackedRows(DOCS, tokenizer, 12, seed=3)
    reference = D.PackedRows(DOCS, tokenizer, 12, seed=3)
    x, y, cu = rows.batch(5)
    assert x.shape == y.shape == (5, 12) and x.dtype == y.dtype == torch.int64 and len(cu) == 5
    assert torch.equal(x[:, 1:], y[:, :-1])
    for b in range(5):
        tokens, c = next(reference)
        assert torch.equal(tokens[:-1], x[b]) and torch.equal(tokens[1:], y[b]) and torch.equal(c, cu[b])
    packed = D.pack_cu_seqlens(cu, 12)
    assert packed.dtype == torch.int32 and packed[0] == 0 and packed[-1] == 60
    assert packed.tolist() == sorted(set(sum(([c + 12 * b for c in cu[b].tolist()] for b in range(5)), [])))


def test_last_batch_and_exhaustion(tokenizer):
    rows = D.PackedRows(DOCS, tokenizer, 16, shuffle=False, repeat=False)
    total = (len(_stream(tokenizer, DOCS)) - 1) // 16
    sizes = []
    while True:
        try:
            sizes.append(len(rows.batch(7)[0]))
        except StopIteration:
            break
    assert sum(sizes) == total and sizes[:-1] == [7] * (len(sizes) - 1)


def test_deterministic_and_epochs_continue(tokenizer):
    rows = D.PackedRows(DOCS, tokenizer, 16, seed=1)
    a = _take(rows, 150)
    assert rows.state_dict()["epoch"] >= 2  # 150 rows span several epochs of this small corpus
    assert a == _take(D.PackedRows(DOCS, tokenizer, 16, seed=1), 150)
    assert a != _take(D.PackedRows(DOCS, tokenizer, 16, seed=2), 150)
    # An epoch holds every document once, in a shuffled order (the last partial row is dropped).
    rows = list(D.PackedRows(DOCS, tokenizer, 16, seed=1, repeat=False))
    tokens = [t for row, _ in rows for t in row.tolist()[:-1]] + [rows[-1][0][-1].item()]
    eos = [j for j, t in enumerate(tokens) if t == tokenizer.eos_token_id]
    docs = [tokenizer.decode(tokens[i + 1:j]) for i, j in zip([-1] + eos, eos)]
    assert len(docs) >= len(DOCS) - 3 and docs != DOCS[:len(docs)]
    assert len(set(docs)) == len(docs) and set(docs) <= set(DOCS)


def test_two_ranks_interleave_to_one_process(tokenizer):
    single = _take(D.PackedRows(DOCS, tokenizer, 16, seed=5), 60)
    ranks = [D.PackedRows(DOCS, tokenizer, 16, seed=5, rank=r, world_size=2) for r in range(2)]
    for step in range(30):
        assert [_take(ranks[r], 1)[0] for r in range(2)] == single[2 * step:2 * step + 2]
    assert ranks[0].state_dict() == ranks[1].state_dict()
    # Global batch 4: one process's batch holds exactly the two ranks' batches of 2.
    one = D.PackedRows(DOCS, tokenizer, 16, seed=5).batch(4)[0]
    two = [D.PackedRows(DOCS, tokenizer, 16, seed=5, rank=r, world_size=2).batch(2)[0] for r in range(2)]
    assert torch.equal(one, torch.stack([two[0][0], two[1][0], two[0][1], two[1][1]]))


def test_three_ranks_share_the_tail_without_repeat(tokenizer):
    single = [t.tolist() for t, _ in D.PackedRows(DOCS, tokenizer, 16, shuffle=False, repeat=False)]
    per_rank = [[t.tolist() for t, _ in D.PackedRows(DOCS, tokenizer, 16, shuffle=False, repeat=False,
                                                      rank=r, world_size=3)] for r in range(3)]
    assert [per_rank[g % 3][g // 3] for g in range(len(single))] == single
    assert sum(map(len, per_rank)) == len(single)


def test_resume_yields_the_uninterrupted_rows(tokenizer):
    uninterrupted = _take(D.PackedRows(DOCS, tokenizer, 16, seed=7), 90)
    for k in (0, 1, 13, 41, 77):  # including positions mid-document and in later epochs
        rows = D.PackedRows(DOCS, tokenizer, 16, seed=7)
        _take(rows, k)
        state = json.loads(json.dumps(rows.state_dict()))  # survives a JSON checkpoint
        resumed = D.PackedRows(DOCS, tokenizer, 16, seed=7)
        resumed.load_state_dict(state)
        assert _take(resumed, 90 - k) == uninterrupted[k:]
    # A one-process state resumes on two ranks (and the other way) at the same global row.
    rows = D.PackedRows(DOCS, tokenizer, 16, seed=7)
    _take(rows, 10)
    halves = [D.PackedRows(DOCS, tokenizer, 16, seed=7, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(rows.state_dict())
    assert [_take(halves[g % 2], 1)[0] for g in range(10)] == uninterrupted[10:20]
    with pytest.raises(ValueError, match="seq_len"):
        D.PackedRows(DOCS, tokenizer, 32, seed=7).load_state_dict(state)


def test_streams_pack_like_lists(tokenizer):
    class Stream:  # re-iterable, not a Sequence: read in its own order, skipped through on resume
        def __iter__(self):
            return iter(DOCS)

    expected = _take(D.PackedRows(DOCS, tokenizer, 16, shuffle=False), 70)
    assert _take(D.PackedRows(Stream(), tokenizer, 16), 70) == expected
    rows = D.PackedRows(Stream(), tokenizer, 16)
    _take(rows, 33)
    resumed = D.PackedRows(Stream(), tokenizer, 16)
    resumed.load_state_dict(rows.state_dict())
    assert _take(resumed, 37) == expected[33:]
    with pytest.raises(ValueError, match="empty"):
        next(D.PackedRows([], tokenizer, 16))


def test_mixed_rows_permute_blocks_and_resume_exactly(tokenizer):
    plain = _take(D.PackedRows(DOCS, tokenizer, 16, seed=3), 40)
    mixed = _take(D.PackedRows(DOCS, tokenizer, 16, seed=3, mix_rows=8), 40)
    for b in range(0, 40, 8):  # each block of 8 stream rows comes out permuted, nothing lost
        assert sorted(map(str, mixed[b:b + 8])) == sorted(map(str, plain[b:b + 8]))
    assert mixed != plain
    for k in (0, 3, 8, 21):  # resume inside a block and at its end
        rows = D.PackedRows(DOCS, tokenizer, 16, seed=3, mix_rows=8)
        _take(rows, k)
        resumed = D.PackedRows(DOCS, tokenizer, 16, seed=3, mix_rows=8)
        resumed.load_state_dict(json.loads(json.dumps(rows.state_dict())))
        assert _take(resumed, 40 - k) == mixed[k:]
    ranks = [D.PackedRows(DOCS, tokenizer, 16, seed=3, mix_rows=8, rank=r, world_size=2) for r in range(2)]
    assert [_take(ranks[g % 2], 1)[0] for g in range(20)] == mixed[:20]
    with pytest.raises(ValueError, match="mix_rows"):
        D.PackedRows(DOCS, tokenizer, 16, seed=3).load_state_dict(rows.state_dict())
