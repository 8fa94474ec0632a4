"""The multi-process commands of docs/distributed.md run as written: each line of its first bash block, launched
on 2 CPU processes (gloo) at the tiny preset instead of 4 GPUs at `small`, and nothing else changed."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, free_port

DOC = ROOT / "docs" / "distributed.md"


def documented_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    assert block, f"{DOC} has no bash block"
    return [line.split("   #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def on_two_cpu_processes(command: str, out: Path) -> list[str]:
    """The documented line with 2 processes for 4, the tiny preset for `small` (which needs OpenWebText and a GPU),
    a free port and an out= of the test's own; the launcher and every other word as written."""
    suite = str(Path(sys.executable).with_name("suite"))
    words = shlex.split(command.replace("$(which suite)", suite))
    assert words.count("preset=small") == 1 and "4" in words, command
    words = [{"4": "2", "preset=small": "preset=tiny"}.get(w, w) for w in words]
    port = ["--main_process_port", str(free_port())] if words[:2] == ["accelerate", "launch"] else \
        ["--master_port", str(free_port())]
    launcher = 2 if words[0] == "accelerate" else 1
    words[0] = str(Path(sys.executable).with_name(words[0]))
    return [*words[:launcher], *port, *words[launcher:], "steps=4", "eval.every=2", f"out={out}", "progress=false"]


@pytest.mark.slow
@pytest.mark.parametrize("line", range(2))
def test_the_documented_multi_process_commands_run(tmp_path, line):
    commands = documented_commands()
    assert len(commands) == 2
    argv = on_two_cpu_processes(commands[line], tmp_path / "run")
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("done: 4 steps") == 1  # said once, by the first process
    assert (tmp_path / "run" / "report.md").is_file()
