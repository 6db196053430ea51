"""Corpus hygiene for evaluation pools: text that gives a document's label away, or that one document shares with
another, is removed before seeds, pool and held-out text are drawn, and every removal is counted.

- ``strip_news_headers``: a Usenet post's header block (RFC 5322 fields such as ``Newsgroups:``, ``Xref:``,
  ``Article-I.D.:``) names its group;
- ``strip_replies``: quoted text (``>`` lines), attribution lines ("In article <...> x writes:") and signatures
  (everything after a ``--`` line) repeat other posts, so a seed's words could reach the pool through a reply;
- ``NearDuplicates``: a chunk that shares a span of ``span`` words with a chunk already kept is dropped (seeds and
  held-out text are offered first, so a pool chunk never repeats them).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

_FIELD = re.compile(r"^[!-9;-~]+:")
"""An RFC 5322 field name (printable ASCII but the colon) and its colon; a folded line starts with a blank."""
_ATTRIBUTION = re.compile(r"^\s*(in article\b.*|.*\b(writes|wrote)\s*:\s*)$", re.I)
_QUOTED = re.compile(r"^\s*[>|]")
_SIGNATURE = re.compile(r"^--\s*$")


def strip_news_headers(post: str) -> str:
    """The post without its header block (up to the first blank line), when every line of that block is a header
    field or a folded continuation of one; else the post as it is."""
    head, sep, body = post.partition("\n\n")
    if sep and all(_FIELD.match(line) or line.startswith((" ", "\t")) for line in head.splitlines() if line.strip()):
        return body.strip()
    return post.strip()


def strip_replies(body: str, counts: Counter[str] | None = None) -> str:
    """The body without quoted lines, attribution lines and its signature; ``counts`` tallies what was dropped
    (``quoted_lines``, ``attribution_lines``, ``signature_lines``)."""
    lines = body.splitlines()
    cut = next((i for i in range(len(lines) - 1, -1, -1) if _SIGNATURE.match(lines[i])), None)
    if cut is not None:
        if counts is not None:
            counts["signature_lines"] += len(lines) - cut
        lines = lines[:cut]
    kept = []
    for line in lines:
        if _QUOTED.match(line):
            what = "quoted_lines"
        elif _ATTRIBUTION.match(line):
            what = "attribution_lines"
        else:
            kept.append(line)
            continue
        if counts is not None:
            counts[what] += 1
    return "\n".join(kept).strip()


def shingles(text: str, span: int) -> set[bytes]:
    """Digests of every run of ``span`` consecutive words (lower-cased, punctuation dropped); a text shorter than
    ``span`` words is one shingle."""
    words = re.findall(r"\w+", text.lower())
    runs = [words[i: i + span] for i in range(max(1, len(words) - span + 1))]
    return {hashlib.blake2b(" ".join(r).encode(), digest_size=8).digest() for r in runs if r}


@dataclass
class NearDuplicates:
    """Keeps a text only if it shares no ``span``-word run with a text kept before it."""

    span: int = 10
    seen: set[bytes] = field(default_factory=set)
    dropped: int = 0

    def keep(self, text: str) -> bool:
        mine = shingles(text, self.span)
        if mine & self.seen:
            self.dropped += 1
            return False
        self.seen |= mine
        return True
