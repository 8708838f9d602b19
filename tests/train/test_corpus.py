"""anyattn.train.corpus: the stdlib corpus (content, determinism, split by file), file corpora,
n-gram baselines and LM batches."""
import hashlib
import math
import platform
import sys
import textwrap

import pytest
import torch

from anyattn.train.corpus import file_corpus, lm_batch, ngram_bits_per_byte, stdlib_corpus


@pytest.fixture(scope="module")
def stdlib():
    return stdlib_corpus()


def _val_rule(name: str) -> bool:
    """The documented split: sha256 of the document's name, first 8 bytes little-endian, mod 10 == 0."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % 10 == 0


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


@pytest.fixture
def tree(tmp_path):
    """A small library: 40 documented modules, one class-and-function file, files to skip, help topics."""
    for i in range(40):
        _write(tmp_path / f"m{i:02d}.py", f'"""doc of m{i:02d}."""\nx = 1\n')
    _write(tmp_path / "pkg" / "mod.py", '''\
        """Module doc."""


        class C:
            """Class doc."""

            def f(self):
                """  Method doc,
                  indented."""


        async def g():
            """Coroutine doc."""
            return 1


        def h():
            return 2
        ''')
    _write(tmp_path / "test" / "test_x.py", '"""test suite doc."""\n')
    _write(tmp_path / "site-packages" / "third.py", '"""third-party doc."""\n')
    _write(tmp_path / "broken.py", '"""broken doc."""\ndef (:\n')
    _write(tmp_path / "pydoc_data" / "topics.py", "# generated\ntopics = {'while': 'The while loop.', 'if': 'The if "
                                                  "statement.'}\n")
    return tmp_path


def test_stdlib_corpus_content(tree):
    c = stdlib_corpus(root=tree)
    assert stdlib_corpus(root=tree) == c  # deterministic
    text = (c.train + c.val).decode()
    block = "Module doc.\n\nClass doc.\n\nMethod doc,\nindented.\n\nCoroutine doc.\n\n"
    assert block in text  # source order, docstrings cleaned, one blank line after each
    assert "The if statement.\n\n" in text and "The while loop.\n\n" in text
    for absent in ("test suite doc", "third-party doc", "broken doc", "generated"):
        assert absent not in text
    assert c.files == 40 + 2  # the modules, pkg/mod.py, pydoc_data/topics.py
    assert c.sha256 == hashlib.sha256(c.train + c.val).hexdigest()
    assert c.python_version == platform.python_version() and str(tree) in c.source


def test_stdlib_corpus_split_by_file(tree):
    c = stdlib_corpus(root=tree)
    in_val = [i for i in range(40) if f"doc of m{i:02d}.".encode() in c.val]
    in_train = [i for i in range(40) if f"doc of m{i:02d}.".encode() in c.train]
    assert sorted(in_val + in_train) == list(range(40))  # each file whole, in exactly one part
    assert in_val == [i for i in range(40) if _val_rule(f"m{i:02d}.py")] and in_val
    topics = {"if": b"The if statement.", "while": b"The while loop."}
    for key, text in topics.items():
        assert (text in c.val) == _val_rule(f"pydoc_data/topics.py:{key}") != (text in c.train)
    # files in sorted path order within each part
    pos = [c.train.index(f"doc of m{i:02d}.".encode()) for i in in_train]
    assert pos == sorted(pos)


def test_stdlib_corpus_max_bytes(tree):
    full = stdlib_corpus(root=tree)
    cut = stdlib_corpus(max_bytes=100, root=tree)
    assert len(cut.train) + len(cut.val) == 100 and cut.val
    assert full.train.startswith(cut.train) and full.val.startswith(cut.val)
    assert cut.sha256 == hashlib.sha256(cut.train + cut.val).hexdigest() != full.sha256
    assert cut.files < full.files


def test_stdlib_corpus_real(stdlib):
    """This interpreter's library: megabytes of text, about a tenth of it validation."""
    c = stdlib
    assert len(c.train) > 1_000_000 and 0.03 < len(c.val) / (len(c.train) + len(c.val)) < 0.3
    assert c.files > 300 and c.python_version == platform.python_version()
    assert b"Return the" in c.train  # docstrings


def test_ngram_baselines_real(stdlib):
    uni = ngram_bits_per_byte(stdlib.train, stdlib.val, 1)
    bi = ngram_bits_per_byte(stdlib.train, stdlib.val, 2)
    assert 3.0 < bi < uni < 6.0  # English prose: about 4.7 and 3.8 bits per byte


def test_ngram_exact():
    """train = val = b"ab": unigram p(a) = p(b) = 1.5 / 130; bigram p(b | a) = 1.5 / 129."""
    assert math.isclose(ngram_bits_per_byte(b"ab", b"ab", 1), -math.log2(1.5 / 130))
    assert math.isclose(ngram_bits_per_byte(b"ab", b"ab", 2), -math.log2(1.5 / 129))
    # an unseen byte costs more than a seen one; a deterministic sequence is cheap for the bigram
    assert ngram_bits_per_byte(b"ab", b"c", 1) > ngram_bits_per_byte(b"ab", b"a", 1)
    periodic = bytes(range(256)) * 4000  # p(b + 1 | b) = 4000.5 / 4128
    assert ngram_bits_per_byte(periodic, periodic, 2) < 0.1 < 7.9 < ngram_bits_per_byte(periodic, periodic, 1) < 8 + 1e-9


@pytest.mark.parametrize("args, error, match", [
    ((b"ab", b"ab", 3), ValueError, "order must be 1"),
    ((b"ab", b"", 1), ValueError, "at least 1 bytes"),
    ((b"ab", b"a", 2), ValueError, "at least 2 bytes"),
    (("ab", b"ab", 1), TypeError, "train must be bytes"),
])
def test_ngram_errors(args, error, match):
    with pytest.raises(error, match=match):
        ngram_bits_per_byte(*args)


def test_file_corpus(tmp_path):
    path = tmp_path / "text.txt"
    data = bytes(range(256)) * 4
    path.write_bytes(data)
    c = file_corpus(path, val_fraction=0.25)
    assert c.train == data[:768] and c.val == data[768:]
    assert c.sha256 == hashlib.sha256(data).hexdigest() and c.files == 1 and c.source == str(path)
    odd = file_corpus(path, val_fraction=0.1)
    assert len(odd.val) == math.ceil(0.1 * 1024) and odd.train + odd.val == data


@pytest.mark.parametrize("content, kwargs, match", [
    (b"abcdef", dict(val_fraction=0.0), "val_fraction must be a float in"),
    (b"abcdef", dict(val_fraction=1), "val_fraction must be a float in"),
    (b"abc", dict(val_fraction=0.5), "too small"),
])
def test_file_corpus_errors(tmp_path, content, kwargs, match):
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        file_corpus(path, **kwargs)


def test_corpus_path_errors(tmp_path):
    with pytest.raises(ValueError, match="corpus path must be a readable file"):
        file_corpus(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="root must be a directory"):
        stdlib_corpus(root=tmp_path / "missing")
    with pytest.raises(ValueError, match="too few documented files"):
        stdlib_corpus(root=tmp_path)
    with pytest.raises(ValueError, match="max_bytes must be >= 2"):
        stdlib_corpus(max_bytes=1, root=tmp_path)


def test_lm_batch():
    data = bytes(range(200))  # every window identifies its offset
    x, y = lm_batch(data, batch_size=64, seq_len=10, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 10) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
    starts = x[:, 0].tolist()
    assert all(x[i].tolist() == list(range(s, s + 10)) for i, s in enumerate(starts))
    assert max(starts) <= 189 and len(set(starts)) > 30  # offsets spread over the whole range
    x2, _ = lm_batch(data, batch_size=64, seq_len=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    edge, _ = lm_batch(data[:11], batch_size=4, seq_len=10, generator=torch.Generator().manual_seed(0))
    assert edge.tolist() == [list(range(10))] * 4


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(data=b"abc", seq_len=3), ValueError, "at least seq_len \\+ 1 = 4 bytes"),
    (dict(data="abcdef"), TypeError, "data must be bytes"),
    (dict(generator=0), TypeError, "generator must be a torch.Generator"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
])
def test_lm_batch_errors(kwargs, error, match):
    opts = dict(data=b"abcdefgh", batch_size=2, seq_len=3, generator=torch.Generator()) | kwargs
    with pytest.raises(error, match=match):
        lm_batch(**opts)


def test_stdlib_corpus_nested_definitions(tmp_path):
    """Definitions under try / except / else / finally / with / if / for / match are read, in source order."""
    for i in range(12):  # enough files for both parts of the split
        _write(tmp_path / f"pad{i}.py", f'"""pad {i}."""\n')
    source = textwrap.dedent('''\
        try:
            def a():
                """A."""
        except ImportError:
            def b():
                """B."""
        else:
            def c():
                """C."""
        finally:
            with open(__file__):
                def d():
                    """D."""
        if True:
            for _ in ():
                def e():
                    """E."""
        ''')
    if sys.version_info >= (3, 10):
        source += 'match 1:\n    case 1:\n        def f():\n            """F."""\n'
    _write(tmp_path / "nested.py", source)
    c = stdlib_corpus(root=tmp_path)
    expected = b"A.\n\nB.\n\nC.\n\nD.\n\nE.\n\n" + (b"F.\n\n" if sys.version_info >= (3, 10) else b"")
    assert expected in c.train + c.val
