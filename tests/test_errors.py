"""Bad input found by trying the scripts as a new user would: each case fails the same clear way in every script,
whether the error arises in the main process or in a DataLoader worker."""
import importlib
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


def run_script(script, tmp_path, root, *args):
    """Run an evaluation script on the labelled folder `root` with a random-init ViT-Tiny/16 on the CPU."""
    output = {"eval_cluster.py": ["--output-json", str(tmp_path / "out.json")],
              "eval_linear.py": ["--output-dir", str(tmp_path / "out"), "--train-split", "val", "--epochs", "1"],
              "unsup_seg.py": ["--output-dir", str(tmp_path / "out"), "--train-split", "val", "--k-fg-extraction",
                               "4", "--k-community", "3", "--eval-size", "16"]}[script]
    return subprocess.run([sys.executable, str(REPO / script), "--pretrained", "none", "--arch", "vit_tiny",
                           "--dataset", "folder", "--data-root", str(root), "--num-classes", "3", "--batch-size", "2",
                           "--device", "cpu", *output, *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, script):
    """Exit 1 with the message alone: the last line of stderr, and before it at most progress lines (no trace)."""
    assert result.returncode == 1, result.stderr[-2000:]
    *before, last = result.stderr.strip().splitlines()
    assert last.startswith(f"{script}: error: "), result.stderr[-2000:]
    assert all("ETA" in line for line in before) and "Traceback" not in result.stderr, result.stderr[-2000:]
    return last


@pytest.mark.parametrize("script,workers,bad_mask,expected", [
    ("eval_cluster.py", 2, "label", "has labels [7] outside 0..2"),
    ("eval_cluster.py", 0, "label", "has labels [7] outside 0..2"),
    ("eval_linear.py", 2, "corrupt", "cannot read mask"),
    ("unsup_seg.py", 2, "label", "has labels [7] outside 0..2"),
])
def test_errors_in_loader_workers_print_one_line(tmp_path, script, workers, bad_mask, expected):
    root = labelled_folder(tmp_path / "set", bad_mask)
    result = run_script(script, tmp_path, root, "--input-size", "64", "--num-workers", str(workers))
    line = assert_one_line_error(result, script)
    assert expected in line and "im2.png" in line


@pytest.mark.parametrize("script,size,grid,needed", [
    ("eval_cluster.py", 40, "2.5x2.5", "1x1"),
    ("eval_linear.py", 8, "0.5x0.5", "1x1"),
    ("unsup_seg.py", 48, "3x3", "4x4"),  # the foreground hint's 7x7 blur needs 4 tokens a side
])
def test_too_small_input_size_names_the_flag(tmp_path, script, size, grid, needed):
    """In-process (no interpreter start-up): the error each script's main turns into its one-line message."""
    module = importlib.import_module(script[:-3])
    root = labelled_folder(tmp_path / "set", None)
    argv = ["--pretrained", "none", "--arch", "vit_tiny", "--dataset", "folder", "--data-root", str(root),
            "--num-classes", "3", "--input-size", str(size), "--num-workers", "0", "--device", "cpu"]
    if script == "unsup_seg.py":
        with pytest.raises(SystemExit) as error:
            module.main(argv + ["--train-split", "val", "--output-dir", str(tmp_path / "out")])
        line = str(error.value)
        assert line.startswith("unsup_seg.py: error: ")
    else:
        with pytest.raises(ValueError) as error:
            module.main(module.get_args_parser().parse_args(argv + ["--output-dir" if "linear" in script else
                                                                     "--output-json", str(tmp_path / "out")]))
        line = data.error_message(error.value)
    assert "\n" not in line and f"--input-size {size} gives a {grid} token grid with patch size 16" in line
    assert f"at least {needed} tokens" in line and not (tmp_path / "out").exists()


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
    # an exception type that cannot be rebuilt from one string comes back as a RuntimeError naming the caught type
    rebuilt = RuntimeError("Caught OSError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                           "last):\n  File \"d.py\", line 5\nOSError: [Errno 5] cannot read b.png\n")
    assert data.error_message(rebuilt) == "[Errno 5] cannot read b.png"
    assert data.error_message(FileNotFoundError("image x.jpg does not exist")) == "image x.jpg does not exist"


@pytest.mark.parametrize("script", ["eval_cluster", "eval_linear", "unsup_seg"])
def test_help_names_the_shared_flags(script):
    text = importlib.import_module(script).get_args_parser().format_help()
    flags = ["--dataset", "--num-classes", "--device", "--num-workers", "--precision", "--quiet"]
    flags += ["--save-maps", "--maps-dir"] if script != "unsup_seg" else ["--attention-pretrained"]
    assert all(flag in text for flag in flags) and "fp32 (default)" in text
