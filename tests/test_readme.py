"""The README's Python blocks run as pasted, one after another in one namespace (issue #10, item 8).

Sizes are reduced (fewer samples, steps and pilot starts) by exact substitutions: a substitution
that no longer matches fails the test, so an edited README is run again as it now reads.
"""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# (block index, text in the README, text run instead): smaller, same code paths.
SMALLER = [
    (0, "(2000, 2)", "(200, 2)"),
    (0, "td.grid_t(process, 250)", "td.grid_t(process, 25)"),
    (0, "truth.sample(20000,", "truth.sample(2000,"),
    (1, "steps=4000)", "steps=30, n_data=500, net={'name': 'mlp', 'width': 32, 'depth': 2}, checkpoint_every=30)"),
    (1, "sample(2000,", "sample(100,"),
    (1, "steps=250,", "steps=10,"),
    (2, "(256, 2)", "(8, 2)"),
    (2, "sample(5000,", "sample(50,"),
    (3, "steps=4000)", "steps=30, n_data=500, net={'name': 'mlp', 'width': 32, 'depth': 2}, checkpoint_every=30)"),
    (3, "sample(1000,", "sample(50,"),
    (5, "steps=2000)", "steps=2, batch_size=8, checkpoint_every=2)"),
    (5, "sample(16,", "sample(2,"),
]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_the_blocks_this_test_shrinks():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 4
    for i, old, _ in SMALLER:
        assert old in blocks[i], f"README python block {i} no longer holds {old!r}: update SMALLER"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    for i, old, new in SMALLER:
        blocks[i] = blocks[i].replace(old, new)
    monkeypatch.chdir(tmp_path)  # the blocks write runs/moons
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert re.search(r"mean log p: DDPM samples -?\d+\.\d{3}, exact samples -?\d+\.\d{3}", out)
    assert (tmp_path / "runs" / "moons" / "checkpoint").is_dir()
    assert (tmp_path / "runs" / "8gaussians" / "checkpoint").is_dir()
    assert namespace["guided"].num_classes == 8
    assert namespace["x0"].shape == (50, 2) and bool(namespace["x0"].isfinite().all())
    assert namespace["x0"].grad_fn is None  # a loaded model records no graph
    assert (tmp_path / "ddpm-diffusers" / "unet" / "config.json").is_file() and namespace["x"].shape == (2, 1, 8, 8)
