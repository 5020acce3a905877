"""Bad input found by trying the scripts as a new user would: each case fails the same clear way in every script,
whether the error arises in the main process or in a DataLoader worker."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data

REPO = Path(__file__).resolve().parents[1]


def labelled_folder(root, bad_mask):
    """A 3-class labelled folder of four 40x40 images; the third mask is `bad_mask`: 'label' (a value 7 outside the
    classes) or 'corrupt' (bytes that are no PNG)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    names = [f"im{i}" for i in range(4)]
    for i, name in enumerate(names):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        mask = rng.integers(0, 3, (40, 40), dtype=np.uint8)
        if i == 2 and bad_mask == "label":
            mask[5, 5] = 7
        Image.fromarray(mask).save(root / "labels" / f"{name}.png")
    if bad_mask == "corrupt":
        (root / "labels" / "im2.png").write_bytes(b"not a png")
    (root / "val.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.mark.parametrize("script,workers,bad_mask,expected", [
    ("eval_cluster.py", 2, "label", "has labels [7] outside 0..2"),
    ("eval_cluster.py", 0, "label", "has labels [7] outside 0..2"),
    ("eval_linear.py", 2, "corrupt", "cannot read mask"),
])
def test_errors_in_loader_workers_print_one_line(tmp_path, script, workers, bad_mask, expected):
    root = labelled_folder(tmp_path / "set", bad_mask)
    extra = ["--train-split", "val", "--val-split", "val", "--epochs", "1"] if script == "eval_linear.py" else []
    result = subprocess.run([sys.executable, str(REPO / script), "--pretrained", "none", "--arch", "vit_tiny",
                             "--dataset", "folder", "--data-root", str(root), "--num-classes", "3",
                             "--input-size", "32", "--batch-size", "2", "--num-workers", str(workers),
                             "--device", "cpu", "--output-dir" if script == "eval_linear.py" else "--output-json",
                             str(tmp_path / "out" if script == "eval_linear.py" else tmp_path / "out.json"), *extra],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), result.stderr[-2000:]
    assert expected in lines[0] and "im2.png" in lines[0]


def test_error_message_unwraps_a_worker_traceback():
    class Chained(ValueError):
        pass

    wrapped = ValueError("Caught ValueError in DataLoader worker process 1.\nOriginal Traceback (most recent call "
                         "last):\n  File \"data.py\", line 3, in load\n    raise ValueError(msg)\nValueError: mask "
                         "a.png has labels [7]\n  across two lines\n")
    assert data.error_message(wrapped) == "mask a.png has labels [7]\n  across two lines"
    qualified = Chained("Caught Chained in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                        "  File \"x.py\", line 1\nValueError: first\n\nThe above exception was the direct cause of the "
                        "following exception:\n\nTraceback (most recent call last):\n  File \"y.py\", line 2\n"
                        "test_errors.Chained: the real one\n")
    assert data.error_message(qualified) == "the real one"
    assert data.error_message(FileNotFoundError("image x.jpg does not exist")) == "image x.jpg does not exist"
