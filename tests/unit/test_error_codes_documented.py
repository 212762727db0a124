"""Every error code the code base can produce is in the README's Errors section, and every code the CLI
prints is in docs/cli.md: a client meeting a code can look it up. Codes are found in the source by the
forms they are written in (`code="…"`, `code = "…"`, `ScriptError("…"`, `"code": "…"`, `error=("…"`,
a classifier's `return "…"` or `fallback="…"`), plus the two families built at run time, named here."""

from __future__ import annotations

import re
from pathlib import Path

from src.api.errors import _HTTP_CODES
from src.services.instances import _BUSY_STATES

ROOT = Path(__file__).resolve().parents[2]
PATTERNS = [
    r'\bcode\s*=\s*"([a-z][a-z0-9_]+)"',
    r'ScriptError\(\s*"([a-z][a-z0-9_]+)"',
    r'"code":\s*"([a-z][a-z0-9_]+)"',
    r'error=\(\s*"([a-z][a-z0-9_]+)"',
    r'return "([a-z]+_[a-z0-9_]+)"',
    r'fallback(?::\s*str)?\s*=\s*"([a-z][a-z0-9_]+)"',
    r'CliFailure\(\s*"([a-z][a-z0-9_]+)"',
]


def codes_in(files: list[Path]) -> dict[str, str]:
    found: dict[str, str] = {}
    for path in files:
        text = path.read_text()
        for pattern in PATTERNS:
            for m in re.finditer(pattern, text):
                found.setdefault(m.group(1), f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}")
    return found


def documented(text: str) -> set[str]:
    return set(re.findall(r"`([a-z][a-z0-9_]+)`", text))


def section(markdown: str, title: str) -> str:
    start = markdown.index(f"\n## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end > 0 else None]


def test_every_api_and_job_error_code_is_in_the_readme():
    sources = [p for p in (ROOT / "src").rglob("*.py") if "cli" not in p.relative_to(ROOT).parts]
    found = codes_in(sources)
    # Built at run time: `machine_<status>` for a busy state, `machine_not_<required>` for pause/resume,
    # and the HTTP errors Flask raises itself.
    found.update({f"machine_{state}": "src/services/instances.py (_require_not)" for state in _BUSY_STATES})
    found.update(
        {f"machine_not_{state}": "src/services/instances.py (_vast_state_job)" for state in ("running", "paused")}
    )
    found.update({code: "src/api/errors.py (_HTTP_CODES)" for code in [*_HTTP_CODES.values(), "http_error"]})
    assert {"not_configured", "bad_config", "remote_exit", "malformed_json"} <= set(found)  # the scan works
    readme = section((ROOT / "README.md").read_text(), "Errors")
    missing = {code: where for code, where in found.items() if code not in documented(readme)}
    assert not missing, f"error codes missing from README.md's Errors section: {missing}"


def test_every_cli_error_code_is_in_docs_cli():
    found = codes_in(sorted((ROOT / "src" / "cli").glob("*.py")))
    assert {"not_migrated", "database_unavailable"} <= set(found)
    missing = {
        code: where for code, where in found.items() if code not in documented((ROOT / "docs" / "cli.md").read_text())
    }
    assert not missing, f"CLI error codes missing from docs/cli.md: {missing}"
