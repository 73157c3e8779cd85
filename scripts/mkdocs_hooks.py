"""mkdocs hooks: the fastrouter's documents (fastrouter/*.md) become pages of the site.

They stay beside the router's code, where its developers read them; the docs link to them as
`../fastrouter/PROTOCOL.md`, which works on GitHub. On the site they are served under
fastrouter/, so those links are pointed there. Nothing is copied into docs/.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROUTER_DOCS = ("README.md", "PROTOCOL.md", "DESIGN.md")

# A Markdown link target in a page at the top of docs/ that leaves docs/ for fastrouter/.
_ROUTER_LINK = re.compile(r"\]\(\.\./fastrouter/")


def on_files(files: Files, config: Any) -> Files:
    root = Path(config["config_file_path"]).resolve().parent / "fastrouter"
    for name in ROUTER_DOCS:
        files.append(File.generated(config, f"fastrouter/{name}", abs_src_path=str(root / name)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if "/" not in page.file.src_uri:
        markdown = _ROUTER_LINK.sub("](fastrouter/", markdown)
    return markdown
