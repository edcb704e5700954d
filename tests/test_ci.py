"""CI runs what README tells a newcomer to run, in the same order, so a broken first step fails CI."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CI_SCRIPT = ROOT / ".ci" / "run"


def readme_quick_start() -> list[str]:
    """The commands of README's first bash block, comments and blank lines aside."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.DOTALL)
    assert block, "README.md starts with no ```bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]


def ci_commands() -> list[str]:
    """What .ci/run executes, shell set-up (set, cd) aside."""
    commands = []
    for raw in CI_SCRIPT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith(("set ", "cd ")):
            continue
        commands.append(line)
    return commands


def test_readme_starts_with_the_demo_then_the_tests() -> None:
    first, second = readme_quick_start()
    assert "postsim demo" in first
    assert "pytest" in second


def test_ci_runs_the_readme_commands_exactly_and_in_order() -> None:
    assert ci_commands() == readme_quick_start()
