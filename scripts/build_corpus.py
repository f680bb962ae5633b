"""Build an offline English corpus (>= 25M RWKV world tokens) from Debian documentation packages.

    python scripts/build_corpus.py [--out data/corpus] [--workdir DIR] [--debs DIR] [--unpinned]

Each package is fetched at the version pinned in ``scripts/corpus.lock.json`` with ``apt-get download NAME=VERSION``
(not installed; or taken from ``--debs DIR``, e.g. .debs fetched from snapshot.debian.org once the archive has moved
on), checked against the lock's .deb sha256, and unpacked with ``dpkg-deb -x`` into a temporary directory; its
documentation sources (reST/Markdown/plain text, mostly Sphinx ``_sources``) become one document per file, in sorted
order, each ending with token 0 (end of document). Package names are Debian 12 "bookworm" ones.
Writes ``OUT.bin``/``OUT.idx`` and ``OUT.manifest.json`` (package versions, .deb and output sha256, licences named
in each package's copyright file, token counts). The result must have the sha256 that ``conf/data/corpus.yaml`` pins
(every run in results/ trained on it), and it never replaces a different corpus; ``--unpinned`` takes the
archive's current versions instead and builds a different corpus, written only where none or an identical one
exists. Needs apt-get, dpkg-deb and the tokenizer extra.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
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

from omegaconf import OmegaConf  # noqa: E402

from harness.data.binidx import BinIdx, magic_prime, write_binidx  # noqa: E402
from harness.data.tokenizer import END_OF_DOCUMENT, WorldTokenizer, load_world_tokenizer  # noqa: E402
from harness.errors import HarnessError, exit_on_user_error  # noqa: E402
from harness.results import file_sha256  # noqa: E402

LOCK = REPO / "scripts" / "corpus.lock.json"
DATA_CONFIG = REPO / "conf" / "data" / "corpus.yaml"
BUILT_SUFFIXES = (".bin", ".idx", ".manifest.json")

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


@dataclass(frozen=True)
class Pin:
    version: str
    deb_sha256: str


def read_pins(lock: Path = LOCK) -> dict[str, Pin]:
    return {name: Pin(**pin) for name, pin in json.loads(lock.read_text())["packages"].items()}


def pinned_corpus_sha256(config: Path = DATA_CONFIG) -> str:
    return OmegaConf.load(config).sha256


def download(name: str, pin: Pin | None, workdir: Path) -> Path:
    """``name`` (at ``pin``'s version when pinned) downloaded with apt-get into ``workdir``."""
    spec = f"{name}={pin.version}" if pin else name
    proc = subprocess.run(["apt-get", "download", spec], cwd=workdir, capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        gone = " (the archive may have moved past the pinned version: put its .deb from snapshot.debian.org in " \
               "--debs DIR)" if pin else ""
        raise HarnessError(f"apt-get download {spec} failed: {last}{gone}")
    (deb,) = workdir.glob(f"{name}_*.deb")
    return deb


def check_deb(deb: Path, name: str, pin: Pin | None) -> str:
    """The .deb's sha256, which must be the pinned one."""
    digest = file_sha256(deb)
    if pin and digest != pin.deb_sha256:
        raise HarnessError(f"{deb} has sha256 {digest[:12]}..., not the {pin.deb_sha256[:12]}... that "
                           f"{LOCK.relative_to(REPO)} pins for {name} {pin.version}")
    return digest


def local_deb(name: str, pin: Pin | None, debs: Path | None) -> Path | None:
    """The pinned .deb of ``name`` in the folder ``debs``, if it is there."""
    if not (debs and pin):
        return None
    return next((deb for deb in sorted(debs.glob(f"{name}_*.deb")) if file_sha256(deb) == pin.deb_sha256), None)


def fetch_package(name: str, pin: Pin | None, workdir: Path, debs: Path | None) -> Package:
    """``name``'s .deb (from ``debs`` when it holds the pinned one, else apt-get), checked and unpacked."""
    deb = local_deb(name, pin, debs) or download(name, pin, workdir)
    digest = check_deb(deb, name, pin)
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                             text=True).stdout.strip()
    root = workdir / name
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return Package(name, version, digest, root)


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


def package_documents(sources: tuple[Source, ...], pins: dict[str, Pin] | None, workdir: Path, debs: Path | None,
                      tokenizer: WorldTokenizer, records: list[dict]) -> Iterator[np.ndarray]:
    for source in sources:
        package = fetch_package(source.package, pins[source.package] if pins else None, workdir, debs)
        files = select_files(package.root, source)
        stats = {"documents": 0, "tokens": 0, "skipped_not_utf8": 0}
        yield from tokenize_files(files, tokenizer, stats)
        records.append({"package": package.name, "version": package.version, "deb_sha256": package.deb_sha256,
                        "licenses": licences(package.root, package.name), "include": list(source.include),
                        "exclude": list(source.exclude), "files": len(files), **stats})
        print(f"{package.name} {package.version}: {stats['documents']} documents, {stats['tokens']} tokens",
              flush=True)


def output_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def install(built: Path, out: Path, pinned: str | None) -> None:
    """Move the files of prefix ``built`` to prefix ``out``: a pinned build only with the pinned sha256, and only over
    no corpus or an identical one (a corpus that runs trained on is never replaced)."""
    digest = file_sha256(Path(f"{built}.bin"))
    if pinned and digest != pinned:
        raise HarnessError(f"the build has sha256 {digest[:12]}..., not the pinned {pinned[:12]}... "
                           f"({DATA_CONFIG.relative_to(REPO)}); nothing was replaced, the build is kept at {built}.*")
    existing = Path(f"{out}.bin")
    if existing.exists() and file_sha256(existing) != digest:
        raise HarnessError(f"{existing} exists and differs from this build; nothing was replaced, the build is kept "
                           f"at {built}.* (move the old corpus away, or choose another --out)")
    for suffix in BUILT_SUFFIXES:
        os.replace(f"{built}{suffix}", f"{out}{suffix}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "corpus", help="output prefix")
    parser.add_argument("--workdir", type=Path, default=None, help="where to download/unpack (default: a temp dir)")
    parser.add_argument("--debs", type=Path, default=None, help="a folder of pinned .debs to use before apt-get")
    parser.add_argument("--unpinned", action="store_true",
                        help="the archive's current versions (a different corpus from the pinned one)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        build(args.out, args.workdir, args.debs, pinned=not args.unpinned)


def build(out: Path, workdir: Path | None, debs: Path | None, pinned: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    pins = read_pins() if pinned else None
    tokenizer = load_world_tokenizer()
    started = time.time()
    records: list[dict] = []
    built = out.with_name(f"{out.name}.building-{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            write_binidx(built, package_documents(SOURCES, pins, Path(tmp), debs, tokenizer, records))
    except BaseException:
        for suffix in BUILT_SUFFIXES:
            Path(f"{built}{suffix}").unlink(missing_ok=True)
        raise
    data = BinIdx(built)
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
        "outputs": {f"{out.name}{path.suffix}": output_record(path) for path in (data.bin_path, data.idx_path)},
        "packages": records,
    }
    Path(f"{built}.manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    install(built, out, pinned_corpus_sha256() if pinned else None)
    print(f"wrote {out}{{{','.join(BUILT_SUFFIXES)}}}: {data.num_tokens} tokens, {data.num_documents} documents in "
          f"{manifest['build_seconds']} s")


if __name__ == "__main__":
    main()
