"""bench.py runs end to end on the CPU (on every torch that requirements.txt admits) and its figures add up."""
import re

import bench

TINY = ["--arch", "vit_tiny", "--patch-size", "16", "--batch-size", "2", "--global-size", "64", "--local-size", "32",
        "--queue-length", "64", "--warmup", "0", "--steps", "2", "--device", "cpu", "--precision", "fp32"]


def test_bench_prints_every_figure_and_the_shares_add_up(capsys):
    bench.main(bench.get_args_parser().parse_args(TINY))
    out = capsys.readouterr().out
    for line in ("first step", "full Leopart step", "plain network work", "overhead ratio", "Sinkhorn alone",
                 "loss alone", "model FLOPs/step"):
        assert line in out, out
    shares = [float(s) for s in re.findall(r"^  \S+(?: \S+)?\s+([\d.]+) %", out, flags=re.M)]
    assert len(shares) == 7 and abs(sum(shares) - 100) < 0.5, out
    assert float(re.search(r"model FLOPs/step\s+([\d.]+) GFLOP", out)[1]) > 0
    assert "MFU n/a" in out  # no known peak on the CPU
