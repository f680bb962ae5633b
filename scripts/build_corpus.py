"""Build an offline English corpus (>= 25M RWKV world tokens) from Debian documentation packages.

    python scripts/build_corpus.py [--out data/corpus] [--workdir DIR]

Each package is fetched with ``apt-get download`` (not installed) and unpacked with ``dpkg-deb -x`` into a temporary
directory; its documentation sources (reST/Markdown/plain text, mostly Sphinx ``_sources``) become one document per
file, in sorted order, each ending with token 0 (end of document). Package names are Debian 12 "bookworm" ones.
Writes ``OUT.bin``/``OUT.idx`` and ``OUT.manifest.json`` (package versions, .deb and output sha256, licences named
in each package's copyright file, token counts). Needs apt-get, dpkg-deb and the tokenizer extra.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.data.binidx import BinIdx, magic_prime, write_binidx  # noqa: E402
from harness.data.tokenizer import END_OF_DOCUMENT, WorldTokenizer, load_world_tokenizer  # noqa: E402

SPHINX_SOURCES = ("**/_sources/**/*.rst.txt", "**/_sources/**/*.md.txt")


@dataclass(frozen=True)
class Source:
    package: str
    include: tuple[str, ...] = SPHINX_SOURCES  # globs relative to the unpacked package root
    exclude: tuple[str, ...] = ()  # substrings of the relative path


SOURCES = (
    Source("linux-doc-6.1", ("usr/share/doc/linux-doc-6.1/html/_sources/**/*.rst.txt",
                             "usr/share/doc/linux-doc-6.1/Documentation/**/*.txt.gz"), ("/translations/",)),
    Source("python3.11-doc"),
    Source("perl-doc", ("usr/share/perl/*/pod/*.pod",)),
    Source("llvm-15-doc"),
    Source("vim-runtime", ("usr/share/vim/vim90/doc/*.txt",)),
    Source("python-sklearn-doc"),
    Source("python-pandas-doc"),
    Source("python-astropy-doc"),
    Source("python-statsmodels-doc"),
    Source("cmake-doc"),
    Source("git-doc", ("usr/share/doc/git-doc/*.txt",)),
    Source("clang-15-doc"),
    Source("python-pytest-doc"),
    Source("python-sympy-doc"),
    Source("python-celery-doc"),
    Source("python-dask-doc"),
    Source("python-ipython-doc"),
    Source("python-xarray-doc"),
    Source("sphinx-doc"),
    Source("python-setuptools-doc"),
    Source("python-cryptography-doc"),
    Source("python-flask-doc"),
    Source("python-tornado-doc"),
)


@dataclass
class Package:
    name: str
    version: str
    deb_sha256: str
    root: Path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_package(name: str, workdir: Path, deb: Path | None = None) -> Package:
    """Download ``name`` with apt-get (unless a local ``deb`` is given) and unpack it under ``workdir``."""
    if deb is None:
        proc = subprocess.run(["apt-get", "download", name], cwd=workdir, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"apt-get download {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
        (deb,) = workdir.glob(f"{name}_*.deb")
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                             text=True).stdout.strip()
    root = workdir / name
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return Package(name, version, sha256(deb), root)


def select_files(root: Path, source: Source) -> list[Path]:
    """Files matching the source's globs, minus exclusions, sorted by relative path (deterministic)."""
    found = {path for pattern in source.include for path in root.glob(pattern) if path.is_file()}
    kept = [path for path in found if not any(s in "/" + path.relative_to(root).as_posix() for s in source.exclude)]
    return sorted(kept, key=lambda path: path.relative_to(root).as_posix())


def read_text(path: Path) -> str | None:
    """The file's text (gunzipped if .gz), or None if it is not valid UTF-8."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def licences(root: Path, package: str) -> list[str]:
    """Licence names from the package's machine-readable (DEP-5) copyright file; empty if missing or free-form."""
    copyright_file = root / "usr/share/doc" / package / "copyright"
    text = copyright_file.read_text("utf-8", "replace") if copyright_file.is_file() else ""
    if not text.startswith("Format:"):
        return []
    return sorted({name.strip() for name in re.findall(r"^License:[ \t]*(\S.*)$", text, re.MULTILINE)})


def tokenize_files(files: list[Path], tokenizer: WorldTokenizer, stats: dict) -> Iterator[np.ndarray]:
    """One document per non-empty UTF-8 file, ending with END_OF_DOCUMENT; counts go into ``stats``."""
    for path in files:
        text = read_text(path)
        if text is None:
            stats["skipped_not_utf8"] += 1
            continue
        if not text.strip():
            continue
        doc = np.array([*tokenizer.encode(text), END_OF_DOCUMENT], dtype=np.uint16)
        stats["documents"] += 1
        stats["tokens"] += len(doc)
        yield doc


def package_documents(sources: tuple[Source, ...], workdir: Path, tokenizer: WorldTokenizer,
                      records: list[dict]) -> Iterator[np.ndarray]:
    for source in sources:
        package = fetch_package(source.package, workdir)
        files = select_files(package.root, source)
        stats = {"documents": 0, "tokens": 0, "skipped_not_utf8": 0}
        yield from tokenize_files(files, tokenizer, stats)
        records.append({"package": package.name, "version": package.version, "deb_sha256": package.deb_sha256,
                        "licenses": licences(package.root, package.name), "include": list(source.include),
                        "exclude": list(source.exclude), "files": len(files), **stats})
        print(f"{package.name} {package.version}: {stats['documents']} documents, {stats['tokens']} tokens",
              flush=True)


def output_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "corpus", help="output prefix")
    parser.add_argument("--workdir", type=Path, default=None, help="where to download/unpack (default: a temp dir)")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = load_world_tokenizer()
    started = time.time()
    records: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        write_binidx(args.out, package_documents(SOURCES, Path(tmp), tokenizer, records))
    data = BinIdx(args.out)
    manifest = {
        "description": "English documentation from Debian packages, RWKV world tokenizer, one document per file, "
                       "each ending with token 0; built by scripts/build_corpus.py. Licences are each package's "
                       "(DEP-5 names below; empty = free-form or no copyright file in the .deb): for local use.",
        "debian_version": Path("/etc/debian_version").read_text().strip(),
        "tokenizer": f"{tokenizer.name}, rwkv_vocab_v20230424",
        "dtype": str(data.dtype),
        "tokens": data.num_tokens,
        "documents": data.num_documents,
        "magic_prime_ctx512": magic_prime(data.num_tokens, 512),
        "build_seconds": round(time.time() - started, 1),
        "outputs": {path.name: output_record(path) for path in (data.bin_path, data.idx_path)},
        "packages": records,
    }
    manifest_path = Path(f"{data.prefix}.manifest.json")
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {data.bin_path}, {data.idx_path}, {manifest_path}: {data.num_tokens} tokens, "
          f"{data.num_documents} documents in {manifest['build_seconds']} s")


if __name__ == "__main__":
    main()
