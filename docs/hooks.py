"""MkDocs hooks: README.md is the site's home page and BENCHMARKS.md its benchmarks page, read from the
repository root at build time, so each text exists once. Links that work on GitHub from the root
(``docs/mla.md``, ``BENCHMARKS.md``) are rewritten to their place on the site."""
from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
GENERATED = {"index.md": "README.md", "benchmarks.md": "BENCHMARKS.md"}


def on_files(files, config):
    for name, source in GENERATED.items():
        files.append(File.generated(config, name, content=(ROOT / source).read_text()))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri in GENERATED:
        markdown = re.sub(r"\]\(docs/", "](", markdown)
        markdown = re.sub(r"\]\(BENCHMARKS\.md", "](benchmarks.md", markdown)
    return markdown
