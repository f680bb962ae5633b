"""binidx files, the magic-prime sampler, StepWindows, the bundled sample and the ``python -m harness.data`` CLI."""

import hashlib
import json
import math
import pickle
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, assert_process_user_error, run_module

from harness.data.binidx import (
    BinIdx,
    DataError,
    ResumeSampler,
    StepWindows,
    default_data_prefix,
    golden_factor,
    is_prime,
    magic_prime,
    validate_for_training,
    window_start,
    write_binidx,
)


def make_data(tmp_path: Path, num_tokens: int = 4000, name: str = "d") -> BinIdx:
    """Tokens 0..num_tokens-1 (int32) in a few documents, so that a window's first token is its offset."""
    tokens = np.arange(num_tokens, dtype=np.int32)
    write_binidx(tmp_path / name, np.array_split(tokens, 7), dtype=np.int32)
    return BinIdx(tmp_path / name)


# ---------------------------------------------------------------------------------------------------- binidx


def test_binidx_round_trip(tmp_path):
    docs = [np.array([5, 6, 7]), np.array([], dtype=np.int64), np.array([65535, 0, 1, 2]), np.array([9])]
    assert write_binidx(tmp_path / "rt", docs) == 8
    data = BinIdx(tmp_path / "rt.bin")  # a .bin/.idx suffix on the prefix is accepted
    assert data.dtype == np.uint16 and data.num_tokens == 8 and data.num_documents == 4
    assert data.tokens.tolist() == [5, 6, 7, 65535, 0, 1, 2, 9]
    assert data.sizes.tolist() == [3, 0, 4, 1]
    assert data.pointers.tolist() == [0, 6, 6, 14]
    assert data.doc_idx.tolist() == [0, 1, 2, 3, 4]
    assert [data.document(i).tolist() for i in range(4)] == [d.tolist() for d in docs]
    assert not list(tmp_path.glob("*.partial"))


def test_writer_rejects_ids_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="do not fit"):
        write_binidx(tmp_path / "big", [np.array([1, 70000])])
    assert not list(tmp_path.iterdir()), "a failed write must leave nothing behind"


def hand_built_index() -> bytes:
    header = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4) + struct.pack("<QQ", 2, 3)
    return header + struct.pack("<2i", 3, 2) + struct.pack("<2q", 0, 12) + struct.pack("<3q", 0, 1, 2)


def test_hand_built_index_is_parsed_and_matches_the_writer(tmp_path):
    (tmp_path / "h.idx").write_bytes(hand_built_index())
    (tmp_path / "h.bin").write_bytes(struct.pack("<5i", 10, 11, 12, -1, 70000))
    data = BinIdx(tmp_path / "h")
    assert data.dtype == np.int32 and data.num_tokens == 5 and data.num_documents == 2
    assert data.sizes.tolist() == [3, 2] and data.pointers.tolist() == [0, 12] and data.doc_idx.tolist() == [0, 1, 2]
    assert data.document(1).tolist() == [-1, 70000]
    write_binidx(tmp_path / "w", [np.array([10, 11, 12]), np.array([-1, 70000])], dtype=np.int32)
    assert (tmp_path / "w.idx").read_bytes() == hand_built_index()
    assert (tmp_path / "w.bin").read_bytes() == (tmp_path / "h.bin").read_bytes()


def corrupt(tmp_path: Path, what: str) -> None:
    write_binidx(tmp_path / "c", [np.arange(100), np.arange(50)])
    idx, bin_ = tmp_path / "c.idx", tmp_path / "c.bin"
    raw = bytearray(idx.read_bytes())
    if what == "magic":
        raw[:9] = b"NOTANIDX\x00"
    elif what == "version":
        raw[9:17] = struct.pack("<Q", 2)
    elif what == "dtype":
        raw[17] = 42
    elif what == "idx truncated":
        raw = raw[:-5]
    elif what == "header truncated":
        raw = raw[:20]
    elif what == "bin truncated":
        bin_.write_bytes(bin_.read_bytes()[:-10])
    elif what == "bin odd bytes":
        bin_.write_bytes(bin_.read_bytes() + b"\x00")
    elif what == "bin missing":
        bin_.unlink()
    elif what == "idx missing":
        idx.unlink()
        return
    idx.write_bytes(bytes(raw))


@pytest.mark.parametrize("what, file, fragment", [
    ("magic", "c.idx", "not a binidx index (bad magic b'NOTANIDX"),
    ("version", "c.idx", "version 2"),
    ("dtype", "c.idx", "unknown dtype code 42"),
    ("idx truncated", "c.idx", "truncated"),
    ("header truncated", "c.idx", "truncated"),
    ("bin truncated", "c.bin", "truncated"),
    ("bin odd bytes", "c.bin", "not a whole number"),
    ("bin missing", "c.bin", "no such file"),
    ("idx missing", "c.idx", "no such file"),
])
def test_bad_files_raise_one_line_data_error(tmp_path, what, file, fragment):
    corrupt(tmp_path, what)
    with pytest.raises(DataError) as info:
        BinIdx(tmp_path / "c")
    message = str(info.value)
    assert str(tmp_path / file) in message and fragment in message and "\n" not in message


# ---------------------------------------------------------------------------------------------------- sampling


def test_magic_prime_matches_rwkv_lm():
    assert magic_prime(1498226207, 512) == 2926181  # MiniPile
    assert magic_prime(332115325534, 4096) == 81082817  # the Pile demo
    assert golden_factor(2926181) == 1808479
    for p in (2926181, 81082817):
        assert golden_factor(p) == (math.isqrt(5 * p * p) - p) // 2  # float phi == exact floor here


def test_magic_prime_is_the_largest_valid_prime():
    ctx_len = 16
    for num_tokens in range(2000, 20000, 97):
        candidates = range(2, num_tokens // ctx_len + 1)
        valid = [p for p in candidates if is_prime(p) and p % 3 == 2 and p < num_tokens / ctx_len - 1]
        expected = max(valid) if valid and max(valid) / (num_tokens // ctx_len) > 0.9 else None
        if expected is None:
            with pytest.raises(DataError, match="ctx_len 16"):
                magic_prime(num_tokens, ctx_len)
        else:
            assert magic_prime(num_tokens, ctx_len) == expected


def test_magic_prime_too_short_is_one_line():
    with pytest.raises(DataError, match=r"^ctx_len 512 is longer than the data \(100 tokens"):
        magic_prime(100, 512)
    with pytest.raises(DataError, match="data too short for ctx_len 512"):
        magic_prime(512 * 3 + 7, 512)


def test_is_prime_against_a_sieve():
    sieve = np.ones(5000, dtype=bool)
    sieve[:2] = False
    for i in range(2, 71):
        sieve[i * i::i] = False
    assert [n for n in range(5000) if is_prime(n)] == np.flatnonzero(sieve).tolist()
    assert is_prime(2**61 - 1) and not is_prime(3215031751)  # a Mersenne prime; a strong pseudoprime to 2,3,5,7


def test_p_consecutive_samples_visit_every_window_once():
    p, ctx_len = 2027, 7
    assert is_prime(p) and p % 3 == 2
    starts = [window_start(ii, p, ctx_len) for ii in range(1, p + 1)]
    assert sorted(starts) == [slot * ctx_len for slot in range(p)]
    assert window_start(p + 5, p, ctx_len) == window_start(5, p, ctx_len)


def test_step_windows_items_follow_the_formula(tmp_path):
    data = make_data(tmp_path)
    p = magic_prime(data.num_tokens, 16)
    windows = StepWindows(data, ctx_len=16, micro_bsz=3, magic_prime=p, start_step=2, num_steps=4)
    assert len(windows) == 12
    x, y = windows[4]  # step 3, row 1: ii = 1 + 3*3 + 1
    start = window_start(11, p, 16)
    assert x.dtype == torch.int64 and x.shape == (16,) and y.shape == (16,)
    assert x.tolist() == list(range(start, start + 16)) and y.tolist() == list(range(start + 1, start + 17))
    with pytest.raises(IndexError):
        windows[12]


def batches(windows: StepWindows) -> list[torch.Tensor]:
    loader = torch.utils.data.DataLoader(windows, batch_size=windows.micro_bsz, shuffle=False, drop_last=True)
    return [x for x, _ in loader]


def test_resumed_run_sees_identical_batches(tmp_path):
    data = make_data(tmp_path)
    p = magic_prime(data.num_tokens, 16)
    full = batches(StepWindows(data, 16, 4, p, start_step=0, num_steps=10))
    resumed = batches(StepWindows(data, 16, 4, p, start_step=6, num_steps=4))
    assert all(torch.equal(a, b) for a, b in zip(full[6:], resumed, strict=True))


def test_resume_sampler_yields_the_remaining_steps_with_the_whole_runs_length(tmp_path):
    """Lightning ends an epoch when its restored batch count reaches len(loader): the resumed loader must report all
    10 steps while yielding steps 3..9, the batches of an uninterrupted run."""
    data = make_data(tmp_path)
    windows = StepWindows(data, 16, 4, magic_prime(data.num_tokens, 16), start_step=0, num_steps=10)
    loader = torch.utils.data.DataLoader(windows, batch_size=4, sampler=ResumeSampler(3 * 4, len(windows)),
                                         drop_last=True)
    assert len(loader) == 10
    resumed = [x for x, _ in loader]
    assert len(resumed) == 7 and all(torch.equal(a, b) for a, b in zip(batches(windows)[3:], resumed, strict=True))
    with pytest.raises(ValueError):
        ResumeSampler(11, 10)


def test_ranks_see_disjoint_samples_whose_union_is_the_global_batch(tmp_path):
    data = make_data(tmp_path)
    p = magic_prime(data.num_tokens, 16)
    single = batches(StepWindows(data, 16, 8, p, start_step=3, num_steps=5))
    ranks = [batches(StepWindows(data, 16, 4, p, start_step=3, num_steps=5, world_size=2, rank=r)) for r in (0, 1)]
    for step, global_batch in enumerate(single):
        rows0, rows1 = ({tuple(row.tolist()) for row in ranks[r][step]} for r in (0, 1))
        assert not rows0 & rows1
        assert rows0 | rows1 == {tuple(row.tolist()) for row in global_batch}


def test_step_windows_pickle_without_the_tokens(tmp_path):
    data = make_data(tmp_path, num_tokens=200_000)
    windows = StepWindows(data, 16, 2, magic_prime(data.num_tokens, 16), start_step=0, num_steps=3)
    blob = pickle.dumps(windows)
    assert len(blob) < 10_000
    clone = pickle.loads(blob)
    assert all(torch.equal(a, b) for a, b in zip(clone[5], windows[5], strict=True))


def test_validate_for_training_errors(tmp_path):
    data = make_data(tmp_path, num_tokens=100)
    with pytest.raises(DataError, match=r"ctx_len 512 is longer than the data \(100 tokens"):
        validate_for_training(data, 512)
    big = make_data(tmp_path, num_tokens=4000, name="big")
    assert validate_for_training(big, 16) == magic_prime(4000, 16)
    with pytest.raises(DataError, match="not a prime"):
        validate_for_training(big, 16, 221)
    with pytest.raises(DataError, match="does not fit"):
        validate_for_training(big, 16, 251)  # prime, 251 % 3 == 2, but 251*16+1 > 4000
    with pytest.raises(DataError, match="does not fit"):
        StepWindows(big, 16, 2, 59, start_step=0, num_steps=1)  # covers < 90% of the windows


# ---------------------------------------------------------------------------------------------------- bundled data


def test_bundled_sample_loads_and_matches_its_checksums():
    data = BinIdx(default_data_prefix())
    assert data.dtype == np.uint16 and data.num_tokens > 100_000
    assert int((np.asarray(data.tokens) == 0).sum()) == data.num_documents and data.tokens[-1] == 0
    notes = (default_data_prefix().parent / "SAMPLE_DATA.md").read_text()
    recorded = dict(re.findall(r"`(sample\.(?:bin|idx))`: sha256 `([0-9a-f]{64})`", notes))
    assert set(recorded) == {"sample.bin", "sample.idx"}
    for name, digest in recorded.items():
        assert hashlib.sha256((default_data_prefix().parent / name).read_bytes()).hexdigest() == digest
    assert f"| tokens | {data.num_tokens} |" in notes
    assert f"| magic_prime at ctx_len 512 | {magic_prime(data.num_tokens, 512)} |" in notes


# ---------------------------------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("harness.data", *args, timeout=120)


@pytest.fixture
def tokenizer():
    from harness.data.tokenizer import TokenizerUnavailable, load_world_tokenizer

    try:
        return load_world_tokenizer()
    except TokenizerUnavailable as exc:
        pytest.skip(str(exc))


def test_tokenizer_round_trips_real_text(tokenizer):
    text = (REPO / "harness" / "data" / "assets" / "SAMPLE_DATA.md").read_text() + "\nünïcödé 世界 🎉\r\n\ttab"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and 0 not in ids and max(ids) < 65536


def test_missing_tokenizer_names_the_extra(monkeypatch):
    from harness.data.tokenizer import TokenizerUnavailable, load_world_tokenizer

    monkeypatch.setitem(sys.modules, "pyrwkv_tokenizer", None)
    monkeypatch.setitem(sys.modules, "rwkv", None)
    with pytest.raises(TokenizerUnavailable, match=re.escape("pip install -e '.[tokenizer]'")):
        load_world_tokenizer()


def test_prepare_and_info_cli(tmp_path, tokenizer):
    texts = ["The quick brown fox jumps over the lazy dog. " * 40, "Second document, from JSON lines.",
             "Third: ünïcödé and\nnewlines."]
    (tmp_path / "a.txt").write_text(texts[0], encoding="utf-8")
    lines = [json.dumps({"text": texts[1]}), "", json.dumps({"text": texts[2], "meta": 1})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = run_cli("prepare", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "o"),
                   "--ctx-len", "4")
    assert proc.returncode == 0, proc.stderr
    data = BinIdx(tmp_path / "o")
    assert data.num_documents == 3
    assert [tokenizer.decode(data.document(i)[:-1].tolist()) for i in range(3)] == texts
    assert [int(data.document(i)[-1]) for i in range(3)] == [0, 0, 0]
    assert f"magic_prime for ctx_len 4: {magic_prime(data.num_tokens, 4)}" in proc.stdout
    info = run_cli("info", str(tmp_path / "o"), "--ctx-len", "4")
    assert info.returncode == 0 and f"{data.num_tokens} tokens, 3 documents, dtype uint16" in info.stdout


@pytest.mark.parametrize("name, content, fragment", [
    ("missing.txt", None, "missing.txt: no such file"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": broken\n', "bad.jsonl:2: not valid JSON"),
    ("notext.jsonl", '{"body": "x"}\n', 'notext.jsonl:1: expected a JSON object with a string field "text"'),
    ("latin1.txt", b"caf\xe9", "latin1.txt: not valid UTF-8"),
    ("data.csv", "a,b\n", "unsupported input type '.csv'"),
])
def test_prepare_bad_input_is_one_line_and_writes_nothing(tmp_path, tokenizer, name, content, fragment):
    good = tmp_path / "good.txt"
    good.write_text("A good document comes first.")
    if isinstance(content, str):
        (tmp_path / name).write_text(content)
    elif content is not None:
        (tmp_path / name).write_bytes(content)
    before = set(tmp_path.iterdir())
    proc = run_cli("prepare", str(good), str(tmp_path / name), "--out", str(tmp_path / "new" / "folder" / "out"))
    assert_process_user_error(proc, fragment)
    assert set(tmp_path.iterdir()) == before  # nor the output folder it would have made


def test_prepare_makes_its_output_folder(tmp_path, tokenizer):
    """The README's own-data recipe, ``prepare a.txt --out data/mine``, where data/ does not exist yet."""
    (tmp_path / "a.txt").write_text("Some text of my own. " * 50)
    proc = run_cli("prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "data" / "mine"), "--ctx-len", "16")
    assert proc.returncode == 0, proc.stderr
    assert BinIdx(tmp_path / "data" / "mine").num_documents == 1


@pytest.mark.parametrize("command", ["prepare", "info"])
@pytest.mark.parametrize("ctx_len", ["0", "-5"])
def test_a_ctx_len_below_one_is_one_line_and_writes_nothing(tmp_path, command, ctx_len):
    (tmp_path / "a.txt").write_text("Some text of my own.")
    write_binidx(tmp_path / "d", [np.arange(100, dtype=np.uint16)])
    before = set(tmp_path.iterdir())
    args = [str(tmp_path / "a.txt"), "--out", str(tmp_path / "mine")] if command == "prepare" else [str(tmp_path / "d")]
    proc = run_cli(command, *args, "--ctx-len", ctx_len)
    assert_process_user_error(proc, f"--ctx-len must be positive, got {ctx_len}")
    assert set(tmp_path.iterdir()) == before


def test_info_on_a_corrupt_index_is_one_line(tmp_path):
    corrupt(tmp_path, "magic")
    proc = run_cli("info", str(tmp_path / "c"))
    assert_process_user_error(proc, "bad magic")
