"""The README's set-up commands are the ones CI runs, in the same order, in both languages."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CI_MARKER = "# README set-up, command 1 then command 2:"


def setup_commands(readme: Path) -> list[str]:
    """The lines of the first ```bash block that installs the package (the set-up)."""
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S):
        if "pip install -e" in block:
            return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    raise AssertionError(f"{readme.name} has no set-up block")


def ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    after = lines[lines.index(CI_MARKER) + 1:]
    return [line for line in after if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_setup_commands_exactly_in_order():
    assert len(setup_commands(ROOT / "README.md")) == 2
    assert ci_commands() == setup_commands(ROOT / "README.md")


def test_both_readmes_give_the_same_setup_commands():
    assert setup_commands(ROOT / "README.zh-CN.md") == setup_commands(ROOT / "README.md")


FIRST_SCREEN = 40


def test_the_first_screen_holds_the_setup_and_the_generated_verdicts_in_both_languages():
    for name in ("README.md", "README.zh-CN.md"):
        head = (ROOT / name).read_text().splitlines()[:FIRST_SCREEN]
        assert all(any(command in line for line in head) for command in setup_commands(ROOT / name)), name
        assert "<!-- headline:start -->" in head and "<!-- headline:end -->" in head, f"{name}: verdicts below line 40"


def test_every_page_the_readmes_link_exists():
    for name in ("README.md", "README.zh-CN.md"):
        for target in re.findall(r"\]\(([^)#]+)[^)]*\)", (ROOT / name).read_text()):
            if not target.startswith("http"):
                assert (ROOT / target).exists(), f"{name} links {target}"
