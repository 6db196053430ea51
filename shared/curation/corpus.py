"""A labelled mixed-domain text pool from real text already on the machine, read where it is installed.

Sources (label: where):
- ``wikipedia``: the Wikipedia dump excerpt in gensim's test data;
- ``news``: the Lee news corpus in gensim's test data;
- ``sci.space`` / ``alt.atheism``: gensim's mini 20-newsgroups sample, without headers (they give the label away),
  quoted replies and signatures (they repeat other posts);
- ``reviews``: movie reviews in gensim's test data;
- ``code``: the Python standard library's source;
- ``math``: SymPy's docstrings;
- ``man``: man pages under /usr/share/man (at most one chunk per program, so one program cannot swamp the sample).

Documents are chunked by lines to about ``chunk_words`` words. Seeds and held-out target documents are whole
documents whose chunks are all kept out of the pool (chunks of a seed's document in the pool would inflate purity),
and a chunk that shares a span of ``dedup_span`` words with a chunk kept before it (seeds first, then held-out text,
then the pool) is dropped.
"""

from __future__ import annotations

import ast
import bz2
import gzip
import html
import importlib.util
import io
import pickle
import random
import re
import sysconfig
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.curation.hygiene import NearDuplicates, strip_news_headers, strip_replies
from shared.errors import DataError


@dataclass(frozen=True)
class Document:
    doc_id: str
    label: str
    text: str


@dataclass(frozen=True)
class Chunk:
    id: str
    doc_id: str
    label: str
    text: str


# ---------------------------------------------------------------------------------------------------------------------
# Locating installed material


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"corpus source needs the '{name}' package installed (pip install {name})")
    return Path(list(spec.submodule_search_locations)[0])


def gensim_data() -> Path:
    return package_dir("gensim") / "test" / "test_data"


# ---------------------------------------------------------------------------------------------------------------------
# Sources


class _BunchAsDict(pickle.Unpickler):
    """gensim's mini_newsgroup is a pickled scikit-learn Bunch: read it as a plain dict without scikit-learn."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if name == "Bunch":
            return dict
        return super().find_class(module, name)


def newsgroups(rng: random.Random, limit: int | None, counts: Counter[str] | None = None) -> Iterator[Document]:
    """Posts without their headers, quoted replies, attributions and signatures (``shared.curation.hygiene``)."""
    raw = zlib.decompress((gensim_data() / "mini_newsgroup").read_bytes())
    bunch = _BunchAsDict(io.BytesIO(raw), encoding="latin1").load()
    for i, (post, target) in enumerate(zip(bunch["data"], bunch["target"])):
        label = bunch["target_names"][target]
        yield Document(f"{label}/{i}", label, strip_replies(strip_news_headers(post), counts))


_WIKI_DROP = [
    (re.compile(r"<ref[^>]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),
    (re.compile(r"\[\[(?:File|Image|Category):[^\]]*\]\]"), ""),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"<[^>]+>"), ""),
]


def _drop_templates(text: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith("{{", i):
            depth, i = depth + 1, i + 2
        elif text.startswith("}}", i) and depth:
            depth, i = depth - 1, i + 2
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean_wikitext(text: str) -> str:
    text = _drop_templates(html.unescape(text))
    for pattern, repl in _WIKI_DROP:
        text = pattern.sub(repl, text)
    lines = [line.strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line and not line.startswith(("*", "|", "!", "{", "}")))


def wikipedia(rng: random.Random, limit: int | None, counts: Counter[str] | None = None) -> Iterator[Document]:
    import xml.etree.ElementTree as ET

    path = next(gensim_data().glob("enwiki-latest-pages-articles1.xml*.bz2"), None)
    if path is None:
        raise DataError("corpus source 'wikipedia': gensim's enwiki test dump is missing")
    for _, elem in ET.iterparse(bz2.open(path), events=("end",)):
        if elem.tag.endswith("}page"):
            title = elem.findtext("{*}title") or ""
            text = elem.findtext("{*}revision/{*}text") or ""
            elem.clear()
            if text.lstrip().upper().startswith("#REDIRECT") or ":" in title:
                continue
            yield Document(f"wikipedia/{title}", "wikipedia", clean_wikitext(text))


def news(rng: random.Random, limit: int | None, counts: Counter[str] | None = None) -> Iterator[Document]:
    for i, line in enumerate((gensim_data() / "lee_background.cor").read_text(encoding="utf-8").splitlines()):
        if line.strip():
            yield Document(f"news/{i}", "news", line.strip())


def reviews(rng: random.Random, limit: int | None, counts: Counter[str] | None = None) -> Iterator[Document]:
    data = gensim_data()
    for i, line in enumerate((data / "alldata-id-10.txt").read_text(encoding="utf-8").splitlines()):
        text = re.sub(r"^_\*\d+\s*", "", line).strip()
        if text:
            yield Document(f"reviews/imdb-{i}", "reviews", text)
    # one-sentence reviews: eight to a document
    sentences = [re.sub(r"^__label__\w+\s*", "", s).strip()
                 for s in (data / "pang_lee_polarity.cor").read_text(encoding="cp1252", errors="replace").splitlines()
                 if s.strip()]
    for i in range(0, len(sentences), 8):
        yield Document(f"reviews/polarity-{i // 8}", "reviews", "\n".join(sentences[i: i + 8]))


def python_source(rng: random.Random, limit: int | None, counts: Counter[str] | None = None) -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("test", "idlelib", "lib2to3", "site-packages", "turtledemo")) or "/test" in rel:
            continue
        try:
            yield Document(f"code/{rel}", "code", path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue


def sympy_docstrings(rng: random.Random, limit: int | None, counts: Counter[str] | None = None) -> Iterator[Document]:
    root = package_dir("sympy")
    paths = sorted(root.rglob("*.py"))
    rng.shuffle(paths)
    for path in paths[: 3 * limit if limit else None]:
        rel = path.relative_to(root).as_posix()
        if "/tests/" in rel or rel.startswith("testing/"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 30:
                    docs.append(doc)
        if docs:
            yield Document(f"math/{rel}", "math", "\n\n".join(docs))


_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),
    (re.compile(r"\\s[+-]?\d"), ""),
    (re.compile(r"\\\((em|en|hy)"), "-"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[&|^%:c]"), ""),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\ "), " "),
]


def roff_to_text(source: str) -> str:
    lines = []
    for line in source.splitlines():
        if line.startswith((".\\\"", "'\\\"", ".so ")):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            if not parts:
                continue
            macro, rest = parts[0], (parts[1] if len(parts) > 1 else "")
            if macro in ("SH", "SS", "B", "I", "BR", "BI", "IB", "RB", "IR", "RI", "TP", "IP", "Nm", "Nd", "Sh"):
                line = rest.replace('"', "")
            else:
                continue
        for pattern, repl in _ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        if line.strip():
            lines.append(line.strip())
    return "\n".join(lines)


def man_pages(rng: random.Random, limit: int | None, counts: Counter[str] | None = None,
              sections: tuple[str, ...] = ("1", "8")) -> Iterator[Document]:
    """Man pages of randomly sampled programs (reading all 18k pages of a Debian image takes too long)."""
    root = Path("/usr/share/man")
    paths = sorted(p for s in sections for p in (root / f"man{s}").glob("*.gz")) if root.is_dir() else []
    if not paths:
        raise DataError(f"corpus source 'man': no man pages under {root}/man{{{','.join(sections)}}}")
    rng.shuffle(paths)
    for path in paths[: 3 * limit if limit else None]:
        try:
            text = roff_to_text(gzip.decompress(path.read_bytes()).decode("utf-8", errors="strict"))
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        program = path.name.split(".")[0]
        yield Document(f"man/{program}", "man", text)


# Each source takes (rng, limit, counts): sources too large to read whole sample their files first; the others ignore
# both. ``counts`` (a Counter) receives what a source's hygiene removed.
Source = Callable[[random.Random, int | None, "Counter[str] | None"], Iterator[Document]]
SOURCES: dict[str, Source] = {
    "newsgroups": newsgroups,
    "wikipedia": wikipedia,
    "news": news,
    "reviews": reviews,
    "code": python_source,
    "math": sympy_docstrings,
    "man": man_pages,
}


# ---------------------------------------------------------------------------------------------------------------------
# Chunking and splitting


def chunk_text(text: str, chunk_words: int, min_words: int) -> list[str]:
    """Consecutive lines grouped to about ``chunk_words`` words; a line longer than that is cut by words; a tail
    shorter than ``min_words`` is dropped."""
    pieces: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) <= chunk_words:
            pieces.append(line.rstrip())
        else:
            pieces.extend(" ".join(words[i: i + chunk_words]) for i in range(0, len(words), chunk_words))
    chunks, current, count = [], [], 0
    for piece in pieces:
        current.append(piece)
        count += len(piece.split())
        if count >= chunk_words:
            chunks.append("\n".join(current).strip())
            current, count = [], 0
    if count >= min_words:
        chunks.append("\n".join(current).strip())
    return [c for c in chunks if len(c.split()) >= min_words]


def chunk_documents(docs: list[Document], chunk_words: int, min_words: int, per_doc: int | None) -> list[Chunk]:
    out: list[Chunk] = []
    for doc in docs:
        pieces = chunk_text(doc.text, chunk_words, min_words)
        if per_doc is not None:
            pieces = pieces[:per_doc]
        out.extend(Chunk(f"{doc.doc_id}#{i}", doc.doc_id, doc.label, text) for i, text in enumerate(pieces))
    return out


@dataclass
class CorpusSplit:
    pool: list[Chunk]
    seeds: list[Chunk]
    heldout: list[Chunk]
    heldout_general: list[Chunk]
    reserve: list[Chunk] = field(default_factory=list)
    """The study's seed reserve: the first chunk of whole documents per study target, kept out of the pool (the
    target's seeds are among them)."""
    near_duplicates: dict[str, int] = field(default_factory=dict)
    """Chunks dropped because they share a span of words with a chunk kept before them, per part."""

    def drop_near_duplicates(self, span: int) -> None:
        """The seed reserve, then seeds, held-out target text, held-out general text and the pool: each chunk is kept
        only if it shares no ``span``-word run with a chunk kept before it (a seed that is in the reserve was checked
        there)."""
        kept = NearDuplicates(span)
        reserved = set()
        for part in ("reserve", "seeds", "heldout", "heldout_general", "pool"):
            chunks = getattr(self, part)
            survivors = [c for c in chunks if c.id in reserved or kept.keep(c.text)]
            if part == "reserve":
                reserved = {c.id for c in survivors}
            self.near_duplicates[part] = len(chunks) - len(survivors)
            setattr(self, part, survivors)


def split_corpus(docs_by_label: dict[str, list[Document]], target: str, *, chunk_words: int, min_words: int,
                 caps: dict[str, int], per_doc: Mapping[str, int | None], n_seeds: int, heldout_target_docs: int,
                 heldout_general_share: float, rng: random.Random, dedup_span: int | None = 10,
                 reserve: Mapping[str, int] | None = None) -> CorpusSplit:
    """Seeds and held-out target documents are whole documents kept out of the pool; ``reserve`` (label -> documents)
    keeps whole documents of each study target out of the pool as its seed reserve (the target's reserve starts with
    its seeds); a share of every other label's documents is held out as general evaluation text; near-duplicate
    chunks are dropped (``dedup_span``; None: kept)."""
    if target not in docs_by_label or not docs_by_label[target]:
        raise DataError(f"target label {target!r} has no documents (labels: {', '.join(sorted(docs_by_label))})")
    reserve = dict(reserve or {})
    unknown = sorted(set(reserve) - set(docs_by_label))
    if unknown:
        raise DataError(f"study target {unknown[0]!r} has no documents (labels: {', '.join(sorted(docs_by_label))})")
    split = CorpusSplit([], [], [], [])
    for label, docs in sorted(docs_by_label.items()):
        docs = sorted(docs, key=lambda d: d.doc_id)
        rng.shuffle(docs)
        if label in reserve:
            docs = [d for d in docs if chunk_text(d.text, chunk_words, min_words)]
        if label == target:
            usable = [d for d in docs if chunk_text(d.text, chunk_words, min_words)]
            kept_out = max(n_seeds, reserve.get(label, 0))
            if len(usable) < kept_out + heldout_target_docs + 1:
                raise DataError(f"target label {target!r} has {len(usable)} usable documents; need more than "
                                f"{kept_out} seeds (or reserve) + {heldout_target_docs} held out")
            held_docs = usable[kept_out: kept_out + heldout_target_docs]
            rest = usable[kept_out + heldout_target_docs:]
            split.seeds.extend(chunk_documents(usable[:n_seeds], chunk_words, min_words, per_doc=1))
            if label in reserve:
                split.reserve.extend(chunk_documents(usable[:kept_out], chunk_words, min_words, per_doc=1))
            split.heldout.extend(chunk_documents(held_docs, chunk_words, min_words, per_doc=None))
            split.pool.extend(chunk_documents(rest, chunk_words, min_words, per_doc.get(label)))
            continue
        if label in reserve:
            if len(docs) <= reserve[label]:
                raise DataError(f"study target {label!r} has {len(docs)} usable documents; need more than "
                                f"{reserve[label]} for its seed reserve")
            split.reserve.extend(chunk_documents(docs[: reserve[label]], chunk_words, min_words, per_doc=1))
            docs = docs[reserve[label]:]
        n_held = int(round(len(docs) * heldout_general_share))
        held = chunk_documents(docs[:n_held], chunk_words, min_words, per_doc.get(label))
        pool = chunk_documents(docs[n_held:], chunk_words, min_words, per_doc.get(label))
        cap = caps.get(label)
        if cap is not None:
            pool = pool[:cap]
            held = held[: max(1, int(cap * heldout_general_share))]
        split.heldout_general.extend(held)
        split.pool.extend(pool)
    if dedup_span is not None:
        split.drop_near_duplicates(dedup_span)
    rng.shuffle(split.pool)
    return split
