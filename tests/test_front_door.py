"""What a new user meets first: --help (plain, complete, no torch import), README synopses equal to the
parsers, the README's Python snippet, no reference to files outside the repository, 80-column progress."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rpl.cli import synopsis

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = synopsis.console_scripts(REPO / "setup.cfg")
HEAVY = ("torch", "torchvision", "timm", "cv2", "safetensors")


def _commands() -> list[tuple[str, list[str]]]:
    """Every console script and each of its sub-commands, as argv prefixes."""
    found = []
    for name, target in SCRIPTS.items():
        parsers = synopsis.parsers(target)
        found.append((name, []))
        found += [(name, [p.prog.split()[-1]]) for p in parsers[1:]]
    return found


def test_readme_synopses_equal_the_parsers():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert synopsis.render(readme, synopsis.synopses(REPO / "setup.cfg")) == readme, \
        "README synopses are stale: run python -m rpl.cli.synopsis --write README.md"
    assert set(SCRIPTS) >= {"rpl-train", "rpl-eval", "rpl-data"}


def test_synopsis_check_fails_on_a_stale_readme(tmp_path, capsys):
    stale = tmp_path / "README.md"
    stale.write_text((REPO / "README.md").read_text(encoding="utf-8").replace("[--resume]", "[--resum]", 1))
    assert synopsis.main(["--check", str(stale)]) == 1
    assert "--resum]" in capsys.readouterr().out
    assert synopsis.main(["--write", str(stale)]) == 0 and synopsis.main(["--check", str(stale)]) == 0
    with pytest.raises(SystemExit, match="no block for rpl-eval"):
        synopsis.render("<!-- synopsis: rpl-train -->\n```\n```\n<!-- /synopsis -->\n", {"rpl-train": "x",
                                                                                         "rpl-eval": "y"})


@pytest.mark.parametrize("name, sub", _commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_help_imports_no_torch(name, sub):
    """--help answers before torch loads (checked by what is imported, not by timing)."""
    code = (f"import sys, json\nfrom {SCRIPTS[name].split(':')[0]} import {SCRIPTS[name].split(':')[1]} as main\n"
            f"try:\n    main({sub + ['--help']!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "COLUMNS": "100"})
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _parsers():
    return [p for target in SCRIPTS.values() for p in synopsis.parsers(target)]


@pytest.mark.parametrize("parser", _parsers(), ids=lambda p: p.prog)
def test_help_is_plain_text_with_every_option_explained_and_its_default(parser):
    text = parser.format_help()
    assert "``" not in text and ":func:" not in text
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help and action.help.strip(), f"{parser.prog} {action.option_strings[0]} has no help"
        if action.default not in (None, False, []) and action.default is not argparse_suppress():
            shown = parser._get_formatter()._expand_help(action)
            assert "default" in shown, f"{parser.prog} {action.option_strings[0]} does not show its default"


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


def test_rpl_eval_compile_modes_match_the_engine():
    from rpl.cli import eval as cli
    from rpl.evaluation import COMPILE_MODES
    assert cli.COMPILE_MODES == COMPILE_MODES


def test_nothing_cites_files_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    cited = [p for p in tracked if p.endswith((".py", ".md", ".yaml", ".cfg", ".txt", ".sh"))
             and "DESIGN.md" in (REPO / p).read_text(encoding="utf-8", errors="replace")
             and p != "tests/test_front_door.py"]
    assert cited == []


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    """The API section's code, as printed, on a CPU (small images keep it to seconds)."""
    pytest.importorskip("torchvision")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python API\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    out, model, target = scope["out"], scope["model"], scope["target"]
    assert out.anomaly_logits.shape == out.logits.shape and out.logits.shape[1] == 19
    assert out.embedding is not None  # training mode: CoroCL's projection
    assert (tmp_path / "addon.safetensors").is_file() and (target == 254).any()


@pytest.mark.parametrize("width", [80, 100])
def test_progress_line_fits_the_terminal(width):
    from rich.console import Console

    from rpl.progress import make_progress

    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=True, color_system=None)
    bar = make_progress(console)
    bar.add_task("train", total=150, completed=37, ips=12.3)
    bar.add_task("synthstreets-obstacle", total=60, completed=60)
    console.print(bar.make_tasks_table(bar.tasks))
    lines = [l for l in buf.getvalue().splitlines() if l.strip()]
    assert len(lines) == 2 and all(len(l) <= width for l in lines)
    assert "…" not in buf.getvalue()
    assert "37/150" in lines[0] and "12.3 img/s" in lines[0] and "eta" in lines[0]
    assert lines[1].startswith("synthstreets-obstacle") and "60/60" in lines[1]
