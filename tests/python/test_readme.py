"""Every ```python block of README.md runs as written, each in a fresh interpreter.

A block whose first line is ``# NAME.py`` is a script that the README launches from a ```bash
block (``torchrun ... NAME.py``): it is written to a file and run with that command line.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")
TIMEOUT_S = 600
SCRIPT_NAME = re.compile(r"#\s*(\w+\.py)\s*$")


def code_blocks(language: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block of the language."""
    blocks, current, start = [], None, 0
    with open(README) as f:
        for number, line in enumerate(f, 1):
            if current is None and line.rstrip() == f"```{language}":
                current, start = [], number + 1
            elif current is not None and line.rstrip() == "```":
                blocks.append((start, "".join(current)))
                current = None
            elif current is not None:
                current.append(line)
    return blocks


PYTHON_BLOCKS = code_blocks("python")
SNIPPETS = [(line, code) for line, code in PYTHON_BLOCKS if not SCRIPT_NAME.match(code.splitlines()[0])]
SCRIPTS = {
    SCRIPT_NAME.match(code.splitlines()[0]).group(1): code
    for _, code in PYTHON_BLOCKS
    if SCRIPT_NAME.match(code.splitlines()[0])
}


def launch_commands() -> list[tuple[str, str]]:
    """(script name, command line) of every bash line that launches one of the README's scripts."""
    commands = []
    for _, code in code_blocks("bash"):
        for line in code.splitlines():
            words = shlex.split(line, comments=True)
            for name in SCRIPTS:
                if name in words:
                    commands.append((name, line))
    return commands


def environment() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # torchrun of this python
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(command: list[str], cwd) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, (
        f"exit code {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    return result


def test_readme_has_examples():
    assert len(SNIPPETS) >= 5
    assert {name for name, _ in launch_commands()} == set(SCRIPTS), "every README script has its launch command"


@pytest.mark.parametrize("line, code", SNIPPETS, ids=[f"README.md:{line}" for line, _ in SNIPPETS])
def test_python_example_runs(line, code, tmp_path):
    run([sys.executable, "-c", code], cwd=tmp_path)


@pytest.mark.parametrize("name, command", launch_commands(), ids=[name for name, _ in launch_commands()])
def test_launched_script_runs(name, command, tmp_path):
    (tmp_path / name).write_text(SCRIPTS[name])
    run(["bash", "-c", command], cwd=tmp_path)
