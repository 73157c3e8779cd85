"""The reference pages of the documentation site cover what the code has: every setting and
every system check id. (The site's links and anchors are checked by `mkdocs build --strict` in
scripts/test.sh.)"""

from __future__ import annotations

import re
from pathlib import Path

from parallel_render import conf

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_settings_page_documents_every_key_with_its_default() -> None:
    text = (DOCS / "settings.md").read_text()
    text = text[text.index("## Reference"):text.index("## Environment variables")]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([A-Z_]+)` \| (.+?) \|", text, re.M)}
    missing = sorted(set(conf.DEFAULTS) - set(rows))
    assert not missing, f"docs/settings.md has no row for {missing}"
    for key, default in conf.DEFAULTS.items():
        written = repr(default).replace("'", '"')  # strings as a settings file writes them
        assert f"`{written}`" in rows[key], f"docs/settings.md gives {key} the default {rows[key]}, not {written}"


def test_troubleshooting_page_explains_every_system_check() -> None:
    source = (ROOT / "parallel_render" / "checks.py").read_text()
    ids = set(re.findall(r'id="(parallel_render\.[EW]\d{3})"', source))
    assert ids, "no check ids found in parallel_render/checks.py"
    text = (DOCS / "troubleshooting.md").read_text()
    missing = sorted(i for i in ids if f"| `{i}` |" not in text)
    assert not missing, f"docs/troubleshooting.md does not explain {missing}"
