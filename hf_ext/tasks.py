"""Real, labelled tasks built from offline assets, for the fine-tuning loops.

``docs-sections``: which top-level section of the Python documentation a paragraph comes from (8
classes: library, reference, tutorial, c-api, howto, whatsnew, faq, extending). The source is Debian's
python3.11-doc reST sources (see ``hf_ext.zoo.PYTHON_DOCS_DIR``).

- A paragraph is a blank-line separated block of at least 200 characters that is mostly prose (letters
  make up more than 60% of it) and not a bare reST directive.
- Paragraphs whose text occurs in more than one section are dropped (they have no single label);
  repeats within one section are kept once.
- The split is fixed and independent of file order: a paragraph is ``eval`` when the SHA-1 of its text
  is 0 mod 10, ``dev`` when it is 1 mod 10, otherwise ``train``. (A file-level split leaves faq and
  extending with no eval files.) ``dev`` is for choosing settings (epoch, learning rate); ``eval`` is
  for reporting only.
- ``max_per_class`` caps each class of the split; library otherwise outnumbers extending 35 to 1. The
  kept paragraphs are those with the smallest SHA-256 of their text: a fixed sample spread over the
  whole section. (Keeping the first ones in path order would give a library class made of modules
  ``2to3`` to ``base64`` only.) Use it on ``train``; ``dev`` and ``eval`` keep the natural mix.

Example:
    >>> from hf_ext.tasks import load_task
    >>> train = load_task("docs-sections", "train", max_per_class=600)  # doctest: +SKIP
    >>> train.texts[0][:40], train.labels[0], train.label_names[train.labels[0]]  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .errors import BadTextError, MissingAssetError

DOCS_SECTIONS = ("library", "reference", "tutorial", "c-api", "howto", "whatsnew", "faq", "extending")
TASKS = ("docs-sections",)


@dataclass
class TextClassificationTask:
    name: str
    split: str
    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self) -> dict[str, int]:
        return {n: self.labels.count(i) for i, n in enumerate(self.label_names)}


def _is_prose(p: str) -> bool:
    return len(p) >= 200 and not p.startswith("..") and sum(c.isalpha() for c in p) > 0.6 * len(p)


SPLITS = ("train", "dev", "eval")


def _split_of(text: str) -> str:
    r = int(hashlib.sha1(text.encode()).hexdigest(), 16) % 10
    return SPLITS[2 - r] if r < 2 else "train"


def docs_sections_paragraphs() -> dict[str, str]:
    """Every usable paragraph -> its section (cross-section duplicates removed)."""
    from .zoo import PYTHON_DOCS_DIR

    if not PYTHON_DOCS_DIR.is_dir():
        raise MissingAssetError("task 'docs-sections' needs Debian's python3.11-doc; install it with: "
                                "apt-get update && apt-get install -y python3.11-doc")
    label: dict[str, str] = {}
    clash: set[str] = set()
    for f in sorted(PYTHON_DOCS_DIR.rglob("*.rst.txt")):
        section = f.relative_to(PYTHON_DOCS_DIR).parts[0]
        if section not in DOCS_SECTIONS:
            continue
        for p in re.split(r"\n\s*\n", f.read_text(encoding="utf-8", errors="replace")):
            p = p.strip()
            if not _is_prose(p):
                continue
            if label.setdefault(p, section) != section:
                clash.add(p)
    return {p: s for p, s in label.items() if p not in clash}


def load_task(name: str, split: str, max_per_class: int | None = None) -> TextClassificationTask:
    """A labelled split of a real task (see the module docstring). ``split``: ``train``, ``dev`` or ``eval``."""
    if name not in TASKS:
        raise BadTextError(f"unknown task '{name}'; available: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise BadTextError(f"split '{split}' does not exist; use one of {', '.join(SPLITS)}")
    if max_per_class is not None and max_per_class < 1:
        raise BadTextError(f"max_per_class={max_per_class} keeps nothing; give a positive number or None")
    rows = [(p, DOCS_SECTIONS.index(s)) for p, s in docs_sections_paragraphs().items() if _split_of(p) == split]
    if max_per_class is not None:
        kept: set[str] = set()
        for y in range(len(DOCS_SECTIONS)):
            ranked = sorted((p for p, c in rows if c == y), key=lambda p: hashlib.sha256(p.encode()).digest())
            kept.update(ranked[:max_per_class])
        rows = [(p, y) for p, y in rows if p in kept]
    texts, labels = [p for p, _ in rows], [y for _, y in rows]
    return TextClassificationTask(name, split, texts, labels, DOCS_SECTIONS)
