"""The README's commands and code, run as written."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
PRAVAHA = [sys.executable, "-m", "worker.cli"]


def code_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_python_example_runs_as_written():
    first = code_blocks("python")[0]
    result = subprocess.run([sys.executable, "-c", first], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "length" in result.stdout and "'num_blocks'" in result.stdout


def test_step_loop_example_runs_after_the_first():
    setup, loop = code_blocks("python")[:2]
    program = setup + "\n" + loop.replace("        ...", "        print(delta.request_id, delta.finished)")
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "req-1 True" in result.stdout


def test_cli_commands_in_readme_run():
    commands = [line.split("#")[0].strip() for block in code_blocks("bash") for line in block.splitlines()
                if line.startswith("pravaha ")]
    assert any(c.startswith("pravaha generate") for c in commands)
    for command in commands:
        command = re.sub(r"\[[^\]]*\]", "", command)  # drop optional-flag placeholders
        args = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', command)][1:]
        result = subprocess.run(PRAVAHA + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (command, result.stderr)
        if args[0] == "demo":
            assert "tokens/s" in result.stdout and "5 requests" in result.stdout


def test_makefile_targets_exist_as_documented():
    makefile = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    for target in ("demo:", "test:"):
        assert target in makefile
    assert "make test" in open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()


def test_cli_reports_bad_model_cleanly():
    result = subprocess.run(PRAVAHA + ["generate", "hi", "--model", "dummy:nope"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown dummy preset 'nope'" in result.stderr
