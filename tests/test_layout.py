"""The tree shows the architecture (ARCHITECTURE.md): bench/core is what is measured and depends on nothing that keeps
runs alive or analyses them; the run path ARCHITECTURE.md lists exists, in the order a run visits it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
UPPER = ("bench.orchestration", "bench.tracking", "bench.report", "bench.sweep", "bench.__main__")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


@pytest.mark.parametrize("path", sorted((BENCH / "core").rglob("*.py")), ids=lambda p: str(p.relative_to(BENCH)))
def test_core_imports_nothing_above_it(path):
    upward = sorted(m for m in imported_modules(path) if m.startswith(UPPER))
    assert not upward, f"{path.relative_to(ROOT)} imports {upward}: bench/core must not depend on them"


def test_the_import_check_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from bench.tracking import Tracker\n")
    assert "bench.tracking" in imported_modules(f)


def test_architecture_run_path_lists_existing_files_at_most_eight():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    section = text.split("## The run path", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `([^`]+)` \|", section, flags=re.M)
    assert [int(n) for n, _ in rows] == list(range(1, len(rows) + 1))
    assert 1 <= len(rows) <= 8
    for _, path in rows:
        assert (ROOT / path).is_file(), path


def test_bench_subcommands_hand_over_to_the_command(monkeypatch):
    from bench import __main__ as entry
    from bench import report
    seen = []
    monkeypatch.setattr(report, "main", lambda argv: seen.append(argv) or 3)
    with pytest.raises(SystemExit) as e:
        entry.main(["report", "--out", "x.md"])
    assert e.value.code == 3 and seen == [["--out", "x.md"]]


def test_bench_script_entry_composes_from_any_folder(tmp_path):
    """The `bench` script imports bench.__main__ as a module (not as __main__) and runs cli(): the config tree is
    found all the same, and cli() keeps main()'s exit codes (0 here; 2 for a bad flag)."""
    import subprocess
    import sys
    entry = [sys.executable, "-c", "import sys; from bench.__main__ import cli; sys.argv[0] = 'bench'; cli()"]
    ok = subprocess.run([*entry, "method=ia3", "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0 and "name: ia3" in ok.stdout, ok.stderr
    bad = subprocess.run([*entry, "--bogus"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unrecognized arguments: --bogus")
