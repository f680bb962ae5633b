"""Training data: binidx files (spec §6.1), RWKV-LM's magic-prime window sampler (spec §5.5) and a small CLI.

    python -m harness.data prepare INPUT... --out PATH [--ctx-len 512]   # .txt (one document) / .jsonl ("text")
    python -m harness.data info PATH [--ctx-len 512]

The sample for a global step is a pure function of (step, batch row, rank), so resumed runs and different
implementations see identical batches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from harness.data.tokenizer import END_OF_DOCUMENT, load_world_tokenizer
from harness.errors import HarnessError, exit_on_user_error

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, number of sequences, doc_idx length
_READ_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64,
                8: np.uint16}
_WRITE_CODES = {np.dtype(t): code for code, t in _READ_DTYPES.items() if np.dtype(t).kind in "iu"}
_GOLDEN = (math.sqrt(5) - 1) / 2  # float, as RWKV-LM computes it, so that phi matches its batches
_MIN_COVERAGE = 0.9  # RWKV-LM asserts magic_prime / floor(tokens / ctx_len) > 0.9
_SCAN_CHUNK = 1 << 24  # tokens per block of the id-range scan (32 MiB of uint16)


class DataError(HarnessError):
    """A problem with a data file or with data-related settings; the message is one line."""


# ---------------------------------------------------------------------------------------------------- binidx


def _paths(prefix: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(prefix, .bin, .idx); a trailing .bin or .idx on the prefix is ignored."""
    prefix = Path(prefix)
    if prefix.suffix in (".bin", ".idx"):
        prefix = prefix.with_suffix("")
    return prefix, Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


def write_binidx(prefix: str | os.PathLike, documents: Iterable[np.ndarray], dtype: type | np.dtype = np.uint16) -> int:
    """Write ``prefix.bin``/``prefix.idx`` (one sequence per document) and return the number of tokens.

    Both files are written under temporary names and renamed at the end, so a failure (also one raised by the
    ``documents`` iterator) leaves no partial output behind.
    """
    dtype = np.dtype(dtype)
    if dtype not in _WRITE_CODES:
        raise ValueError(f"binidx token dtype must be one of {sorted(str(d) for d in _WRITE_CODES)}, got {dtype}")
    _, bin_path, idx_path = _paths(prefix)
    tmp_bin, tmp_idx = Path(f"{bin_path}.partial"), Path(f"{idx_path}.partial")
    try:
        with open(tmp_bin, "wb") as f:
            sizes = [_write_document(f, doc, dtype) for doc in documents]
        _write_index(tmp_idx, dtype, sizes)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    return sum(sizes)


def _write_document(f, doc: np.ndarray, dtype: np.dtype) -> int:
    arr = np.asarray(doc)
    if arr.ndim != 1:
        raise ValueError(f"a document must be a 1-D token array, got shape {arr.shape}")
    if arr.size:
        if arr.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got {arr.dtype}")
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise ValueError(f"token ids {arr.min()}..{arr.max()} do not fit {dtype}")
    if arr.size > np.iinfo(np.int32).max:
        raise ValueError(f"a document of {arr.size} tokens is too long for a binidx index (int32 sizes)")
    f.write(arr.astype(dtype.newbyteorder("<"), copy=False).tobytes())
    return int(arr.size)


def _write_index(path: Path, dtype: np.dtype, sizes: Sequence[int]) -> None:
    sizes_arr = np.asarray(sizes, dtype="<i4")
    pointers = np.zeros(len(sizes), dtype="<i8")
    np.cumsum(sizes_arr[:-1].astype("<i8") * dtype.itemsize, out=pointers[1:])
    doc_idx = np.arange(len(sizes) + 1, dtype="<i8")
    with open(path, "wb") as f:
        f.write(_HEADER.pack(_MAGIC, _VERSION, _WRITE_CODES[dtype], len(sizes), len(doc_idx)))
        for arr in (sizes_arr, pointers, doc_idx):
            f.write(arr.tobytes())


class BinIdx:
    """A memory-mapped binidx pair. ``tokens`` is the whole ``.bin`` as one flat array (what the trainer samples).

    Pickles as its prefix only: a DataLoader worker re-opens (and re-validates) the files itself.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix, self.bin_path, self.idx_path = _paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise DataError(f"{path}: no such file (expected the binidx pair {self.prefix}.bin/.idx)")
        self.dtype, self.sizes, self.pointers, self.doc_idx = _read_index(self.idx_path)
        self.num_tokens = self._check_bin()
        self.tokens = self._map_tokens()

    def _check_bin(self) -> int:
        nbytes = self.bin_path.stat().st_size
        itemsize = self.dtype.itemsize
        if nbytes % itemsize:
            raise DataError(f"{self.bin_path} has {nbytes} bytes, not a whole number of {self.dtype} tokens")
        if len(self.sizes) and (self.sizes.min() < 0 or self.pointers.min() < 0):
            raise DataError(f"{self.idx_path} is corrupt: it has negative document sizes or offsets")
        ends = self.pointers + self.sizes.astype(np.int64) * itemsize
        needed = int(ends.max()) if len(ends) else 0
        if nbytes < needed:
            raise DataError(f"{self.bin_path} is truncated: its index needs {needed} bytes, the file has {nbytes}")
        return nbytes // itemsize

    def _map_tokens(self) -> np.ndarray:
        if not self.num_tokens:  # numpy cannot memory-map an empty file
            return np.empty(0, dtype=self.dtype)
        return np.memmap(self.bin_path, dtype=self.dtype.newbyteorder("<"), mode="r")

    @property
    def num_documents(self) -> int:
        return len(self.sizes)

    def document(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    def __reduce__(self):
        return BinIdx, (str(self.prefix),)


def _read_index(path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    nbytes = path.stat().st_size
    if nbytes < _HEADER.size:
        raise DataError(f"{path} is truncated: {nbytes} bytes, shorter than the {_HEADER.size}-byte binidx header")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    magic, version, code, n, doc_count = _HEADER.unpack_from(raw)
    if magic != _MAGIC:
        raise DataError(f"{path} is not a binidx index (bad magic {magic!r}, expected {_MAGIC!r})")
    if version != _VERSION:
        raise DataError(f"{path} has binidx version {version}; only version {_VERSION} is supported")
    if code not in _READ_DTYPES:
        raise DataError(f"{path} has unknown dtype code {code} (known: {sorted(_READ_DTYPES)})")
    expected = _HEADER.size + 12 * n + 8 * doc_count
    if nbytes != expected:
        problem = "is truncated" if nbytes < expected else "has trailing bytes"
        raise DataError(f"{path} {problem}: its header declares {n} sequences and {doc_count} doc_idx entries "
                        f"({expected} bytes), the file has {nbytes}")
    sizes = np.frombuffer(raw, dtype="<i4", count=n, offset=_HEADER.size)
    pointers = np.frombuffer(raw, dtype="<i8", count=n, offset=_HEADER.size + 4 * n)
    doc_idx = np.frombuffer(raw, dtype="<i8", count=doc_count, offset=_HEADER.size + 12 * n)
    return np.dtype(_READ_DTYPES[code]), sizes, pointers, doc_idx


def token_range(data: BinIdx) -> tuple[int, int]:
    """The smallest and largest token id in ``data`` (0, -1 when it is empty). The scan reads the whole ``.bin``
    once; its result is cached per file (see :func:`_range_cache_file`), so later runs on it read nothing."""
    cache = _range_cache_file(data.bin_path)
    stamp = _file_stamp(data.bin_path)
    cached = _read_cached_range(cache, stamp)
    if cached is not None:
        return cached
    low, high = _scan_range(data.tokens)
    with suppress(OSError):  # an unwritable cache only costs the next run the scan again
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps({**stamp, "min": low, "max": high}))
        os.replace(partial, cache)
    return low, high


def check_token_ids(data: BinIdx, vocab_size: int) -> None:
    """Raise a one-line DataError unless every token id of ``data`` lies in [0, vocab_size): an id outside it is an
    IndexError mid-run on a CPU and a device-side assert on a GPU, if a window ever samples it."""
    low, high = token_range(data)
    if data.num_tokens == 0 or (low >= 0 and high < vocab_size):
        return
    position = _first_outside(data.tokens, vocab_size)
    bigger_vocab = f" or a model.vocab_size above {high}" if low >= 0 else ""
    raise DataError(f"{data.bin_path} holds token id {int(data.tokens[position])} at token {position}, outside the "
                    f"model's vocabulary 0..{vocab_size - 1} (the data's ids span {low}..{high}); use data tokenized "
                    f"for this vocabulary{bigger_vocab}")


def _scan_range(tokens: np.ndarray) -> tuple[int, int]:
    if not len(tokens):
        return 0, -1
    ranges = [(int(block.min()), int(block.max())) for _, block in _blocks(tokens)]
    return min(low for low, _ in ranges), max(high for _, high in ranges)


def _first_outside(tokens: np.ndarray, vocab_size: int) -> int:
    for start, block in _blocks(tokens):
        outside = np.flatnonzero((block < 0) | (block >= vocab_size))
        if outside.size:
            return start + int(outside[0])
    raise ValueError("no token id outside the vocabulary")


def _blocks(tokens: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, tokens) blocks of ``_SCAN_CHUNK`` tokens: a scan of a memory map never holds more than one."""
    for start in range(0, len(tokens), _SCAN_CHUNK):
        yield start, tokens[start:start + _SCAN_CHUNK]


def _range_cache_file(bin_path: Path) -> Path:
    """``$XDG_CACHE_HOME/rwkv7-harness/token-range/<hash of the .bin's absolute path>.json`` (``~/.cache`` without
    XDG_CACHE_HOME): outside the data's folder, which may be read-only (the bundled sample in site-packages)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(bin_path.resolve()).encode()).hexdigest()[:32]
    return root / "rwkv7-harness" / "token-range" / f"{key}.json"


def _file_stamp(path: Path) -> dict[str, object]:
    """What identifies this version of the file without reading it: a rewrite changes its size or mtime."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _read_cached_range(cache: Path, stamp: dict[str, object]) -> tuple[int, int] | None:
    try:
        record = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or any(record.get(key) != value for key, value in stamp.items()):
        return None
    low, high = record.get("min"), record.get("max")
    return (low, high) if isinstance(low, int) and isinstance(high, int) else None


def default_data_prefix() -> Path:
    """Prefix of the bundled sample data set (see harness/data/assets/SAMPLE_DATA.md)."""
    return Path(__file__).resolve().parent / "assets" / "sample"


# ---------------------------------------------------------------------------------------------------- sampling


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (bases 2..41 are exact below 3.3e24)."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    if n in bases:
        return True
    if any(n % b == 0 for b in bases):
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _check_ctx_len(num_tokens: int, ctx_len: int) -> None:
    if ctx_len < 1:
        raise DataError(f"ctx_len must be positive, got {ctx_len}")
    if num_tokens < ctx_len + 1:
        raise DataError(f"ctx_len {ctx_len} is longer than the data ({num_tokens} tokens; a window needs ctx_len+1)")


def magic_prime(num_tokens: int, ctx_len: int) -> int:
    """Largest prime p ≡ 2 (mod 3) with p < num_tokens/ctx_len - 1 and p > 0.9·floor(num_tokens/ctx_len)."""
    _check_ctx_len(num_tokens, ctx_len)
    windows = num_tokens // ctx_len
    p = (num_tokens - 1) // ctx_len - 1  # largest integer with (p + 1)·ctx_len < num_tokens
    p -= (p - 2) % 3
    while p >= 2 and p > _MIN_COVERAGE * windows:
        if is_prime(p):
            return p
        p -= 3
    raise DataError(f"data too short for ctx_len {ctx_len}: {num_tokens} tokens make {windows} windows and no prime "
                    f"p ≡ 2 (mod 3) lies in ({_MIN_COVERAGE * windows:g}, {num_tokens / ctx_len - 1:g}); "
                    "use more data or a shorter ctx_len")


def golden_factor(magic_prime: int) -> int:
    """phi = floor(p·(√5−1)/2), in float64 exactly as RWKV-LM computes it (1808479 for p = 2926181)."""
    return int(magic_prime * _GOLDEN)


def window_start(sample_number: int, magic_prime: int, ctx_len: int) -> int:
    """Token offset of the 1-based sample ``ii``: ctx_len · ((phi · ii³) mod p); the window has ctx_len+1 tokens."""
    cube = pow(sample_number, 3, magic_prime)
    return golden_factor(magic_prime) * cube % magic_prime * ctx_len


def validate_for_training(data: BinIdx, ctx_len: int, prime: int | None = None) -> int:
    """Check that ``data`` can feed ctx_len windows and return the magic prime (computed when ``prime`` is None)."""
    if data.dtype.kind not in "iu":
        raise DataError(f"{data.bin_path} holds {data.dtype} values, not integer token ids")
    if prime is None:
        return magic_prime(data.num_tokens, ctx_len)
    _check_ctx_len(data.num_tokens, ctx_len)
    windows = data.num_tokens // ctx_len
    if not (is_prime(prime) and prime % 3 == 2):
        raise DataError(f"magic_prime {prime} is not a prime ≡ 2 (mod 3)")
    if prime * ctx_len + 1 > data.num_tokens or prime <= _MIN_COVERAGE * windows:
        raise DataError(f"magic_prime {prime} does not fit {data.num_tokens} tokens at ctx_len {ctx_len} "
                        f"(need {_MIN_COVERAGE:g}·{windows} < p and p·ctx_len+1 <= tokens; "
                        f"`python -m harness.data info {data.prefix} --ctx-len {ctx_len}` prints the right one)")
    return prime


class StepWindows(Dataset):
    """Windows for global steps start_step .. start_step+num_steps-1 of one rank, in DataLoader order.

    Item j is (x, y), int64 [ctx_len] each, for global step s = start_step + j // micro_bsz and batch row
    b = j % micro_bsz, taken from sample ii = 1 + s·micro_bsz·world_size + b·world_size + rank: RWKV-LM's
    ``1 + epoch·40320 + idx·W + rank`` without the 40320-samples-per-epoch constraint. Ranks see disjoint samples.
    """

    def __init__(self, data: BinIdx, ctx_len: int, micro_bsz: int, magic_prime: int, start_step: int,
                 num_steps: int, world_size: int = 1, rank: int = 0):
        if micro_bsz < 1 or world_size < 1 or not 0 <= rank < world_size or start_step < 0 or num_steps < 0:
            raise ValueError(f"bad StepWindows arguments: micro_bsz={micro_bsz} world_size={world_size} rank={rank} "
                             f"start_step={start_step} num_steps={num_steps}")
        self.magic_prime = validate_for_training(data, ctx_len, magic_prime)
        self.data, self.ctx_len, self.micro_bsz = data, ctx_len, micro_bsz
        self.start_step, self.num_steps, self.world_size, self.rank = start_step, num_steps, world_size, rank

    def __len__(self) -> int:
        return self.num_steps * self.micro_bsz

    def sample_number(self, j: int) -> int:
        step, row = divmod(j, self.micro_bsz)
        return 1 + (self.start_step + step) * self.micro_bsz * self.world_size + row * self.world_size + self.rank

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= j < len(self):
            raise IndexError(f"index {j} out of range for {len(self)} windows")
        start = window_start(self.sample_number(j), self.magic_prime, self.ctx_len)
        window = torch.from_numpy(self.data.tokens[start:start + self.ctx_len + 1].astype(np.int64))
        return window[:-1], window[1:]


class ResumeSampler(Sampler[int]):
    """Window indices ``start`` .. ``total - 1`` of a run's :class:`StepWindows`, reporting the whole run's length.

    On resume Lightning restores how many batches the checkpointed epoch had already counted and ends the epoch when
    that count reaches ``len(dataloader)``. A loader of the remaining steps alone would therefore end the epoch
    early and start a new one from the resume step, replaying seen data (found in a run resumed at step 319 of
    1000: its steps 681-999 saw the data of steps 319-637). Reporting the whole run keeps epoch and run one."""

    def __init__(self, start: int, total: int):
        if not 0 <= start <= total:
            raise ValueError(f"bad ResumeSampler arguments: start={start} total={total}")
        self.start, self.total = start, total

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.total))


# ---------------------------------------------------------------------------------------------------- CLI


def _check_inputs(paths: Sequence[Path]) -> None:
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        if path.suffix not in (".txt", ".jsonl"):
            raise DataError(f"{path}: unsupported input type {path.suffix!r} (expected .txt or .jsonl)")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _jsonl_text(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(f'{where}: expected a JSON object with a string field "text"')
    return record["text"]


def read_documents(paths: Sequence[Path], advance: Callable[[int], object] = lambda n: None) -> Iterator[str]:
    """Texts of the documents in ``paths``: a whole .txt file, or each non-blank line's "text" of a .jsonl file.

    ``advance(nbytes)`` is called as input bytes are consumed (for a progress bar).
    """
    for path in paths:
        if path.suffix == ".txt":
            raw = path.read_bytes()
            advance(len(raw))
            yield _decode(raw, str(path))
            continue
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                advance(len(raw))
                line = _decode(raw, f"{path}:{lineno}")
                if line.strip():
                    yield _jsonl_text(line, f"{path}:{lineno}")


def _magic_prime_line(num_tokens: int, ctx_len: int) -> str:
    try:
        return f"magic_prime for ctx_len {ctx_len}: {magic_prime(num_tokens, ctx_len)}"
    except DataError as exc:
        return f"magic_prime for ctx_len {ctx_len}: none ({exc})"


@contextmanager
def _output_folder(folder: Path) -> Iterator[None]:
    """``folder``, made with its missing parents, and removed again with them when what writes into it fails (a
    failed prepare leaves nothing behind)."""
    made = [path for path in (folder, *folder.parents) if not path.exists()]  # the deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for path in made:
            with suppress(OSError):
                path.rmdir()
        raise


def _prepare(inputs: Sequence[Path], out: Path, ctx_len: int) -> None:
    from tqdm import tqdm

    _check_inputs(inputs)
    tokenizer = load_world_tokenizer()
    total = sum(path.stat().st_size for path in inputs)
    with _output_folder(out.parent), tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing",
                                          disable=None) as bar:
        docs = (np.array([*tokenizer.encode(text), END_OF_DOCUMENT], dtype=np.uint16)
                for text in read_documents(inputs, bar.update) if text)
        write_binidx(out, docs)
    data = BinIdx(out)
    print(f"wrote {data.bin_path} and {data.idx_path}: {data.num_tokens} tokens in {data.num_documents} documents "
          f"({tokenizer.name})")
    print(_magic_prime_line(data.num_tokens, ctx_len))


def _info(path: Path, ctx_len: int) -> None:
    data = BinIdx(path)
    print(f"{data.prefix}: {data.num_tokens} tokens, {data.num_documents} documents, dtype {data.dtype}")
    print(_magic_prime_line(data.num_tokens, ctx_len))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.data", description="Prepare and inspect binidx data.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize .txt/.jsonl files into a binidx pair")
    prep.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    prep.add_argument("--out", required=True, type=Path,
                      help="output prefix (writes PATH.bin and PATH.idx, making PATH's folder where it is missing)")
    prep.add_argument("--ctx-len", type=int, default=512)
    info = sub.add_parser("info", help="print the size and magic prime of a binidx pair")
    info.add_argument("path", type=Path, help="binidx prefix (or its .bin/.idx)")
    info.add_argument("--ctx-len", type=int, default=512)
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if args.ctx_len < 1:
            raise DataError(f"--ctx-len must be positive, got {args.ctx_len}")
        try:
            if args.command == "prepare":
                _prepare(args.inputs, args.out, args.ctx_len)
            else:
                _info(args.path, args.ctx_len)
        except OSError as exc:
            raise DataError(str(exc)) from None

