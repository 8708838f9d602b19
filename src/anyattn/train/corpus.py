"""Byte-level language-modelling corpora, n-gram baselines and batches.

`stdlib_corpus` builds a corpus at run time from text every Python installation has: the docstrings
of the standard library's modules, classes and functions (read with `ast`, nothing is imported) and
the help topics of `pydoc_data/topics.py` (the text of `help("if")`, Python's language reference).
It reads the running interpreter's library directory, so the corpus depends on the Python version;
`Corpus.sha256` and `Corpus.python_version` record which corpus a result was measured on.
`file_corpus` reads any file. `ngram_bits_per_byte` gives the unigram / bigram baselines a language
model has to beat, and `lm_batch` samples training windows.
"""
from __future__ import annotations

import ast
import hashlib
import math
import os
import platform
import sysconfig
from dataclasses import dataclass

import numpy as np
import torch

from ..validate import check_positive_int

__all__ = ["Corpus", "stdlib_corpus", "file_corpus", "ngram_bits_per_byte", "lm_batch"]

# Directories of the library that are not its documentation: the test suites (which also hold files
# that do not parse on purpose), third-party packages, byte-code caches.
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
TOPICS_FILE = "pydoc_data/topics.py"
VAL_BUCKETS = 10  # a document is validation when sha256(name) mod VAL_BUCKETS == 0: about 10 %
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass
class Corpus:
    """train / val bytes; sha256 (hex) of `train + val`; source (where the text came from);
    python_version of the interpreter that built it; files (source files with text in the corpus)."""
    train: bytes
    val: bytes
    sha256: str
    source: str
    python_version: str
    files: int


def _statements(node):
    """`node` and the statements nested in it, in source order (expressions are not visited: a
    docstring belongs to a module, class or function, and those are statements)."""
    yield node
    for field in ("body", "handlers", "orelse", "finalbody", "cases"):  # lists of statements, handlers, cases
        for child in getattr(node, field, ()):
            yield from _statements(child)


def _docstrings(tree: ast.Module) -> list[str]:
    """The module, class and function docstrings of a parsed file, in source order."""
    docs = (ast.get_docstring(n) for n in _statements(tree) if isinstance(n, _DOC_NODES))
    return [d for d in docs if d]


def _topics(tree: ast.Module) -> list[tuple[str, str]]:
    """(name, text) of each entry of the `topics = {...}` literal of pydoc_data/topics.py, by name."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets)):
            topics = ast.literal_eval(node.value)
            return sorted((f"{TOPICS_FILE}:{key}", text) for key, text in topics.items())
    return []


def _documents(root: str) -> list[tuple[str, str]]:
    """(name, text) of every document under `root`: one per .py file (its docstrings, each followed by
    a blank line), one per help topic; sorted by relative path, topics by name. Files that do not
    parse with this Python's `ast` are left out."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        rel = os.path.relpath(dirpath, root)
        paths += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in filenames if f.endswith(".py")]
    docs = []
    for rel in sorted(paths):
        with open(os.path.join(root, rel), "rb") as f:
            source = f.read()
        try:
            tree = ast.parse(source, filename=rel)
        except (SyntaxError, ValueError):
            continue
        if rel == TOPICS_FILE:
            docs += [(name, text + "\n\n") for name, text in _topics(tree)]
        else:
            text = "".join(d + "\n\n" for d in _docstrings(tree))
            if text:
                docs.append((rel, text))
    return docs


def _is_val(name: str) -> bool:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % VAL_BUCKETS == 0


def _file_count(names: list[str]) -> int:
    return len({name.split(":")[0] for name in names})


def stdlib_corpus(max_bytes: int | None = None, *, root: str | None = None) -> Corpus:
    """The docstrings of the standard library and pydoc's help topics, as UTF-8 bytes.

    Reads every `.py` file under `root` (default: this interpreter's `sysconfig` "stdlib" directory)
    except in the directories `SKIPPED_DIRS`, in sorted path order. Split by document (a file, or one
    help topic): a document whose name's sha256 is 0 mod 10 goes to `val`. `max_bytes` caps
    `len(train) + len(val)`: both are cut at their ends, `val` keeping its share (at least one byte).
    Deterministic: the same Python and library give the same bytes and `sha256`.
    """
    if max_bytes is not None:
        check_positive_int("max_bytes", max_bytes, minimum=2)
    root = sysconfig.get_paths()["stdlib"] if root is None else os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"root must be a directory, got {root!r}")
    docs = _documents(root)
    train_docs = [(n, t.encode()) for n, t in docs if not _is_val(n)]
    val_docs = [(n, t.encode()) for n, t in docs if _is_val(n)]
    train = b"".join(t for _, t in train_docs)
    val = b"".join(t for _, t in val_docs)
    if not train or not val:
        raise ValueError(f"root {root!r} holds too few documented files for a train and a validation split "
                         f"(train {len(train)} bytes, val {len(val)} bytes)")
    if max_bytes is not None and len(train) + len(val) > max_bytes:
        n_val = max(1, round(max_bytes * len(val) / (len(train) + len(val))))
        train, val = train[:max_bytes - n_val], val[:n_val]
    names = _kept(train_docs, len(train)) + _kept(val_docs, len(val))
    return Corpus(train=train, val=val, sha256=hashlib.sha256(train + val).hexdigest(),
                  source=f"Python {platform.python_version()} standard library docstrings and pydoc topics ({root})",
                  python_version=platform.python_version(), files=_file_count(names))


def _kept(docs: list[tuple[str, bytes]], length: int) -> list[str]:
    """Names of the documents that start within the first `length` bytes of their concatenation."""
    names, start = [], 0
    for name, text in docs:
        if start >= length:
            break
        names.append(name)
        start += len(text)
    return names


def file_corpus(path, val_fraction: float = 0.1) -> Corpus:
    """Any file as a byte corpus: the last `ceil(val_fraction * size)` bytes are `val`, the rest `train`."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a float in (0, 1), got {val_fraction!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"corpus path must be a readable file, got {path!r}")
    with open(path, "rb") as f:
        data = f.read()
    n_val = math.ceil(val_fraction * len(data))
    if len(data) - n_val < 2 or n_val < 2:
        raise ValueError(f"corpus {path!r} has {len(data)} bytes: too small for train and validation parts of "
                         f"at least 2 bytes each at val_fraction={val_fraction}")
    return Corpus(train=data[:-n_val], val=data[-n_val:], sha256=hashlib.sha256(data).hexdigest(),
                  source=os.path.abspath(path), python_version=platform.python_version(), files=1)


def _as_tensor(name: str, data) -> torch.Tensor:
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"{name} must be bytes, got {type(data).__name__}")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))


def ngram_bits_per_byte(train: bytes, val: bytes, order: int) -> float:
    """Cross-entropy on `val`, in bits per byte, of a byte n-gram model fitted on `train` with add-1/2
    smoothing: order 1 `p(b) = (c(b) + 1/2) / (N + 128)`; order 2 `p(b | a) = (c(a b) + 1/2) / (c(a .) + 128)`,
    scoring `val[1:]` given the byte before each."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (unigram) or 2 (bigram), got {order!r}")
    tr, va = _as_tensor("train", train), _as_tensor("val", val)
    if len(tr) < order or len(va) < order:
        raise ValueError(f"train and val must hold at least {order} bytes for order {order}, "
                         f"got {len(tr)} and {len(va)}")
    if order == 1:
        counts = torch.bincount(tr, minlength=256).double() + 0.5
        logp = counts.log2() - counts.sum().log2()
        return float(-logp[va].mean())
    counts = (torch.bincount(tr[:-1] * 256 + tr[1:], minlength=256 * 256).double() + 0.5).view(256, 256)
    logp = counts.log2() - counts.sum(dim=1, keepdim=True).log2()
    return float(-logp[va[:-1], va[1:]].mean())


def lm_batch(data: bytes, *, batch_size: int, seq_len: int,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` windows of `seq_len + 1` bytes at uniformly random offsets of `data` (drawn from the
    CPU `generator`): inputs `(B, L)` long = the first L bytes, targets `(B, L)` long = the last L (the
    next byte of each input byte)."""
    check_positive_int("batch_size", batch_size)
    check_positive_int("seq_len", seq_len)
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if len(data) < seq_len + 1:
        raise ValueError(f"data must hold at least seq_len + 1 = {seq_len + 1} bytes, got {len(data)}")
    starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator).numpy()  # host: byte offsets
    windows = np.frombuffer(data, dtype=np.uint8)[starts[:, None] + np.arange(seq_len + 1)]
    windows = torch.from_numpy(windows.astype(np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
