"""The scripts in examples/, run as a user runs them: `python examples/<name>.py` in a shell
where CIPHERPOOL_URL and CIPHERPOOL_API_KEY point at a running stack (here an embedded one
with a single pool node, which each script binds and frees in turn). Each must exit 0, end
with its agreement line, and show what it is about."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cipherpool.config.settings import Settings
from cipherpool.stack.embedded import EmbeddedStack, StackOptions

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SENTENCE = "The staff were wonderful and the view was beautiful."


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """A stack as `cipherpool up` leaves it, and the environment a user would export."""
    tmp = tmp_path_factory.mktemp("examples")
    with EmbeddedStack(Settings(data_dir=tmp / "platform"), StackOptions(nodes=1, beat=False, flower=False)) as stack:
        env = {
            **os.environ,
            "CIPHERPOOL_URL": stack.gateway_url,
            "CIPHERPOOL_API_KEY": stack.create_account("examples"),
            "CIPHERPOOL_DATA_DIR": str(tmp / "client"),
        }
        yield env


def run_example(env: dict[str, str], name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, f"examples/{name}.py", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{name}.py exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.parametrize("name", ["digits", "health", "image", "sentiment"])
def test_an_example_agrees_with_its_clear_model(running, name, tmp_path):
    args = {"image": ["--out", str(tmp_path / "out")], "sentiment": [SENTENCE]}.get(name, [])
    out = run_example(running, name, *args)
    count = {"image": 1, "sentiment": 1}.get(name, 3)
    assert out.strip().splitlines()[-1] == f"all {count} answers agree with the clear model", out
    assert "DISAGREE" not in out
    if name == "digits":
        assert out.count("test image ") == 3 and "truth" in out
    elif name == "health":
        patients = [line for line in out.splitlines() if line.startswith("patient ") and "FHE P(malignant)" in line]
        assert len(patients) == 3 and sum("truth malignant" in line for line in patients) == 1, out
    elif name == "image":
        for png_name in ("original", "sharpened_fhe", "sharpened_clear"):
            path = tmp_path / "out" / f"{png_name}.png"
            assert path.stat().st_mode & 0o077 == 0, "the user's pixels are private"
            with Image.open(path) as png:
                assert (png.size, png.mode) == ((64, 64), "L")
        with (
            Image.open(tmp_path / "out" / "sharpened_fhe.png") as fhe,
            Image.open(tmp_path / "out" / "sharpened_clear.png") as clear,
        ):
            assert fhe.tobytes() == clear.tobytes()  # the images on disk, not only the printed line
        assert "max difference from the clear model 0 gray levels" in out
        error = re.search(r"against the float convolution: max (\d+) gray levels", out)
        assert error and int(error.group(1)) <= 2, out
    else:
        assert f"{SENTENCE!r}: FHE positive" in out
    # every printed answer: the FHE figure beside the clear one, and they agree
    pairs = {
        "digits": r"FHE digit (\d+) \| clear digit (\d+)",
        "health": r"FHE P\(malignant\) ([\d.]+) \| clear ([\d.]+)",
        "sentiment": r"\(P ([\d.]+)\) \| clear P ([\d.]+)",
    }.get(name)
    if pairs:
        found = re.findall(pairs, out)
        assert len(found) == count, out
        assert all(abs(float(fhe) - float(clear)) <= 1e-3 for fhe, clear in found), found
