"""The RWKV "world" tokenizer (rwkv_vocab_v20230424, spec §6.2) from a maintained PyPI package.

Preferred: ``pyrwkv-tokenizer`` (Rust, fast). Fallback: the pure-Python ``TRIE_TOKENIZER`` of the ``rwkv`` package.
Both produce identical ids (checked on the CPython and Linux documentation). Id 0 is not in the vocabulary; RWKV
tooling uses it as the end-of-document token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from harness.errors import HarnessError

END_OF_DOCUMENT = 0
INSTALL_HINT = "pip install -e '.[tokenizer]'"


class TokenizerUnavailable(HarnessError, ImportError):
    """No RWKV world tokenizer package is installed."""


class WorldTokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class _PyRwkvTokenizer:
    def __init__(self) -> None:
        import pyrwkv_tokenizer

        self._tok = pyrwkv_tokenizer.RWKVTokenizer()
        self.name = f"pyrwkv-tokenizer {pyrwkv_tokenizer.__version__}"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))


class _RwkvTrieTokenizer:
    def __init__(self) -> None:
        from importlib.metadata import version

        from rwkv import rwkv_tokenizer

        vocab = Path(rwkv_tokenizer.__file__).with_name("rwkv_vocab_v20230424.txt")
        self._tok = rwkv_tokenizer.TRIE_TOKENIZER(str(vocab))
        self.name = f"rwkv {version('rwkv')} (TRIE_TOKENIZER)"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))


def load_world_tokenizer() -> WorldTokenizer:
    """Return the RWKV world tokenizer, or raise :class:`TokenizerUnavailable` with the install command."""
    for backend in (_PyRwkvTokenizer, _RwkvTrieTokenizer):
        try:
            return backend()
        except ImportError:
            continue
    raise TokenizerUnavailable(f"no RWKV world tokenizer is installed; run: {INSTALL_HINT}")
