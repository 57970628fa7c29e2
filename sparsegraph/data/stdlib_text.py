"""Real English text with no download: sentences from the docstrings of Python's standard library.

Every ``.py`` file under the interpreter's stdlib directory is parsed (``ast``, not imported) and its
module, class and function docstrings are split into sentences. Kept: 6 to 60 words, starting with a
capital letter, ending with a full stop, with no code-like characters (``>>>``, ``::``, ``{``, ``=``,
backticks). Duplicates are dropped.

The split is deterministic and independent of the file walk order: a sentence goes to ``heldout`` when
its sha1 (first byte) falls in the last 5/16ths, to ``calibration`` otherwise, and each split is sorted
by hash. So calibration and evaluation never share a sentence, on every machine with the same Python.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import itertools
import re
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LIKE = re.compile(r">>>|::|[{}=`\\]|\w\(\)|\(\w*\)|\w_\w|--")
SPLITS = ("calibration", "heldout")


def sentences(split: str = "calibration", limit: int | None = None, min_words: int = 6) -> list[str]:
    """Sentences of one split (``calibration`` or ``heldout``), in a fixed order, at most `limit`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    chosen = [s for s in _all() if (_hash(s)[0] >= 176) == (split == "heldout")
              and len(s.split()) >= min_words]
    return chosen[:limit] if limit is not None else chosen


def documents(tokenizer, split: str, count: int, length: int) -> list[str]:
    """`count` texts of at least `length` tokens (by `tokenizer`), each made of consecutive sentences of
    `split` (cycling through them): long inputs for statistics bound to a sequence length (attention
    layouts)."""
    return list(itertools.islice(pack(tokenizer, itertools.cycle(sentences(split)), length), count))


def pack(tokenizer, texts: Iterable[str], length: int) -> Iterator[str]:
    """`texts` joined in order into texts of at least `length` tokens (by `tokenizer`); what is left at
    the end comes last, shorter."""
    current = ""
    for text in texts:
        current = f"{current} {text}".strip()
        # verbose=False: counting a text past the model's maximum length is the point here, not a mistake
        if len(tokenizer(current, verbose=False)["input_ids"]) >= length:
            yield current
            current = ""
    if current:
        yield current


SKIP_DIRS = ("test", "tests", "idlelib", "site-packages", "lib2to3")


def docstrings(keep: Callable[[str], bool] = lambda module: True) -> Iterator[str]:
    """Every module, class and function docstring of the stdlib's ``.py`` files (sorted paths, parsed
    with ``ast``, not imported) whose top-level module name `keep` accepts; test, IDLE and site-packages
    folders and files that do not parse are skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if any(part in SKIP_DIRS for part in path.parts) or not keep(
                path.relative_to(root).parts[0].removesuffix(".py")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


@functools.lru_cache(maxsize=1)
def _all() -> tuple[str, ...]:
    found: set[str] = set()
    for doc in docstrings():
        found.update(_sentences(doc))
    return tuple(sorted(found, key=_hash))


def _sentences(doc: str) -> list[str]:
    out = []
    for para in doc.split("\n\n"):
        text = " ".join(para.split())
        for s in _SPLIT.split(text):
            words = s.split()
            if (6 <= len(words) <= 60 and s[0].isupper() and s.endswith(".") and not _CODE_LIKE.search(s)
                    and s.isascii()):
                out.append(s)
    return out


def _hash(s: str) -> bytes:
    return hashlib.sha1(s.encode()).digest()
