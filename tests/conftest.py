"""Shared test fixtures: where the reference data lives, and a skip when it is absent (as on a user's machine)."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# ../shared holds the golden outputs of the original code, the real ViT-S/14 weights and the small real data sets.
SHARED = Path(os.environ.get("LEOPART_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"
WEIGHTS = SHARED / "weights"
DATA = SHARED / "data"


# The distributed tests start all their processes on this machine: keep gloo on the loopback interface. Left to
# choose, gloo uses the interface of the host name's address, and on a sandboxed machine with torch 2.5 that hung.
if sys.platform.startswith("linux"):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def require(path: Path) -> Path:
    """Return `path`, or skip the calling test with a reason when the reference file is not on this machine."""
    if not path.exists():
        pytest.skip(f"reference file {path} is absent (../shared is only on the development machines)")
    return path
