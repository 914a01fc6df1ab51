"""Tests import the flat modules from the repository root, whatever directory pytest starts in."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def fresh_python(script: str, timeout=300) -> str:
    """Run `script` in a fresh interpreter at the repository root; its stdout (a failure shows its stderr).
    For what the test process itself would blur: glibc's heap, which pytest has already shaped."""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
