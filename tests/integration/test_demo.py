"""The README's main job: `cipherpool demo` on the embedded stack, as a user runs it: the
quick default (digits) as text with --explain. It asserts that every decrypted answer agrees
with the model's clear answer, from the printed figures, not from the exit status alone. All
four tutorials: tests/integration/test_tutorials_all.py."""

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def processes_mentioning(text: str, but: int = 0) -> list[int]:
    """Live processes (other than ``but``) whose command line or environment names ``text``:
    the demo's data dir, which its Redis, nodes and gateway all inherit."""
    found = []
    needle = text.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == but:
            continue
        try:
            if needle in (proc / "cmdline").read_bytes() or needle in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def test_the_default_demo_is_digits_and_explains_each_step(tmp_path):
    data_dir = str(tmp_path / "demo")
    with subprocess.Popen(
        [sys.executable, "-m", "cipherpool", "demo", "--explain", "--data-dir", data_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as running:
        children: set[int] = set()
        reader = threading.Thread(target=lambda: output.extend(running.communicate(timeout=900)))
        output: list[str] = []
        reader.start()
        while reader.is_alive():
            children.update(processes_mentioning(data_dir, but=running.pid))
            time.sleep(0.5)
    out, err = output
    assert running.returncode == 0, out[-3000:] + err[-3000:]
    assert len(children) >= 3  # Redis, a pool node, the gateway … were seen running
    assert not processes_mentioning(data_dir), "the demo stops every process it started"
    answers = re.findall(r"test image (\d)\s+FHE digit (\d)\s+\|\s+clear digit (\d) · truth: (\d)\s+✓ agree", out)
    assert len(answers) == 4 and all(fhe == clear for _, fhe, clear, _ in answers), out
    assert "DISAGREE" not in out and "health" not in out  # digits only
    for step in ("key generation", "evaluation-key upload", "encrypt", "queue wait", "compute (on the node)", "decrypt"):
        assert re.search(rf"  {re.escape(step)}\s+\d+(\.\d+)? (ms|s)", out), step
    assert "evaluated once on 1 of 1 node(s)" in out  # the warm-up
    assert "key cache 4 hits / 0 miss" in out  # the warm-up loaded the key before the first query
    sent = re.search(
        r"the end user sent (\d+) requests .*?; (\d+) bodies checked for \d+ samples of the secret key "
        r"and 4 clear inputs: found in none of them",
        out,
    )
    assert sent and int(sent.group(1)) == int(sent.group(2)) > 0, out[-2000:]  # every body read, none held them
    assert "where: end user's machine" in out and "crossed: nothing: the secret key" in out
    assert "fetch the model's client specs" in out and "the node's command queue" in out
    assert "each of the 4 queries" in out and out.count("in the task message") == 1  # 1.9 kB ciphertexts ride inline
