"""Naming-alignment weight converter between RWKV-LM, FLA / Hugging Face and harness checkpoints, and export of
training runs.

    python -m harness.convert SRC DST [--from FMT] [--to FMT] [--impl NAME] [--dtype keep|bf16|fp32]
                              [--dry-run] [--force]

Formats: ``rwkv-lm`` (a ``.pth`` state dict with RWKV-LM x070 names), ``fla`` (a directory that
``RWKV7ForCausalLM.from_pretrained`` loads: ``config.json`` + ``model.safetensors``) and ``harness`` (this harness's
``.safetensors`` checkpoint, see :mod:`harness.model.checkpoint`); as a source also ``run``: a run directory (its last
checkpoint) or one of its ``checkpoints/step-N.ckpt``. Model dimensions come from the tensor shapes. Any problem is
one line on stderr, exit code 2, and nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import impls
from harness.convert.convert import DTYPES, convert
from harness.convert.readers import SOURCE_FORMATS
from harness.convert.writers import TARGET_FORMATS
from harness.errors import USER_ERRORS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print the usage block too)
        self.exit(2, f"error: {message} (see python -m harness.convert --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m harness.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help=".pth or canonical .safetensors (rwkv-lm), FLA directory, harness "
                                               ".safetensors, or a run directory or its checkpoints/step-N.ckpt")
    parser.add_argument("dst", type=Path, help="output path; its suffix picks the format unless --to is given")
    parser.add_argument("--from", dest="from_fmt", choices=SOURCE_FORMATS, help="source format (default: detected)")
    parser.add_argument("--to", dest="to_fmt", choices=TARGET_FORMATS,
                        help="target format (default: .pth rwkv-lm, .safetensors harness, no suffix fla)")
    parser.add_argument("--impl", choices=impls.names(),
                        help="implementation of a harness target (default: the source's, else reference)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="keep", help="tensor dtype (default: keep)")
    parser.add_argument("--dry-run", action="store_true", help="print the mapping table, write nothing")
    parser.add_argument("--force", action="store_true", help="replace an existing destination")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        lines = convert(args.src, args.dst, args.from_fmt, args.to_fmt, args.impl, args.dtype, args.dry_run,
                        args.force)
    except USER_ERRORS as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
