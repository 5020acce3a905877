"""Host-device synchronisations in a training step, counted on the CPU.

A GPU runs ahead of the Python thread until something makes the host wait for a device result: a scalar read
(`.item()`, `bool(t)`, `int(t)`, `float(t)`, `if t:`), a copy to the host (`.tolist()`, `.cpu()`, `.numpy()`), an
op whose output size depends on the data (`nonzero`, boolean-mask indexing, `masked_select`, `unique`,
`repeat_interleave` with tensor repeats and no `output_size`), or a host value copied to the device
(`torch.tensor(x, device=...)`: a pageable copy that PyTorch synchronises). On the CPU none of these waits, but each
call is still visible, so they can be counted here and kept out of the step (tests/test_train.py counts them in
train.py's step).

Usage, from any test (tests/ is on sys.path under pytest):

    from test_sync import count_host_syncs
    with count_host_syncs() as syncs:
        loss = model(crops, boxes)
    assert syncs.count == 0, syncs.report()

`syncs.events` lists (kind, where) per event: `where` names the innermost caller outside torch and, for an event
inside torch, the torch frame it came from (e.g. `via torch/optim/optimizer.py:102 (_get_value)`).
Ops are seen through a TorchDispatchMode, so syncs inside torch (e.g. an optimizer's `.item()`) and in backward
are counted too; calls that dispatch nothing on a CPU tensor (`tolist`, `cpu`, `numpy`, `torch.tensor`) are
caught by wrapping them for the duration of the block.
"""
import contextlib
import os
import traceback
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode


aten = torch.ops.aten

# Ops that make the host wait for the device on a GPU, whatever their arguments.
SYNCING_OPS = {
    aten._local_scalar_dense.default: "scalar read (.item(), bool(), int(), float())",
    aten.is_nonzero.default: "scalar read (bool())",
    aten.equal.default: "torch.equal (returns a host bool)",
    aten.nonzero.default: "nonzero (data-dependent size)",
    aten.nonzero_numpy.default: "nonzero / torch.where(cond) (data-dependent size)",
    aten.masked_select.default: "masked_select (data-dependent size)",
    aten._unique2.default: "unique (data-dependent size)",
    aten.unique_dim.default: "unique (data-dependent size)",
    aten.unique_consecutive.default: "unique_consecutive (data-dependent size)",
    aten.bincount.default: "bincount (size from the data's maximum)",
}

TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _is_machinery(frame):
    """torch's private modules (dispatch, dynamo, tensor wrappers), mock, and this file's counting code."""
    filename = frame.filename
    if (filename == __file__ and frame.name in ("record", "__torch_dispatch__", "wrapper")) or \
            filename.endswith(os.path.join("unittest", "mock.py")):
        return True
    if not filename.startswith(TORCH_DIR):
        return False
    relative = filename[len(TORCH_DIR):]
    return relative.startswith("_") or relative in ("functional.py", "overrides.py") or \
        relative.startswith(os.path.join("utils", "_"))


def _where(stack):
    """'file:line (function)' of the innermost caller outside torch, plus the innermost public torch frame (e.g.
    torch/optim/adamw.py) when the event comes from inside torch."""
    outside = [f for f in stack if not f.filename.startswith(TORCH_DIR) and not _is_machinery(f)]
    where = f"{outside[-1].filename}:{outside[-1].lineno} ({outside[-1].name})" if outside else "?"
    inside = [f for f in stack if f.filename.startswith(TORCH_DIR) and not _is_machinery(f)]
    if inside and (not outside or stack.index(inside[-1]) > stack.index(outside[-1])):
        where += f" via torch/{inside[-1].filename[len(TORCH_DIR):]}:{inside[-1].lineno} ({inside[-1].name})"
    return where


def _bool_index(indices):
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices if i is not None)


def _is_cpu_target(args, kwargs):
    targets = list(args) + [kwargs.get("device")]
    return any((isinstance(t, str) and t.startswith("cpu")) or (isinstance(t, torch.device) and t.type == "cpu")
               for t in targets)


class HostSyncCounter(TorchDispatchMode):
    """Records every op that would synchronise host and device on a GPU (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.events = []

    @property
    def count(self):
        return len(self.events)

    def record(self, kind):
        self.events.append((kind, _where(traceback.extract_stack())))

    def report(self):
        if not self.events:
            return "no host syncs"
        return f"{self.count} host syncs:\n" + "\n".join(f"  {kind} at {where}" for kind, where in self.events)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING_OPS:
            self.record(SYNCING_OPS[func])
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                      aten._index_put_impl_.default) and _bool_index(args[1]):
            self.record(f"boolean-mask indexing ({func.name()}, data-dependent size)")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.record("repeat_interleave with tensor repeats and no output_size")
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs():
    """`with count_host_syncs() as syncs:` counts the host syncs of the block in `syncs.count` / `syncs.events`."""
    counter = HostSyncCounter()

    def wrap(owner, name, kind, only_if=None):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if only_if is None or only_if(args[1:], kwargs):
                counter.record(kind)
            return original(*args, **kwargs)
        return mock.patch.object(owner, name, wrapper)

    with contextlib.ExitStack() as stack:
        for patch in (wrap(torch.Tensor, "tolist", "copy to the host (.tolist())"),
                      wrap(torch.Tensor, "cpu", "copy to the host (.cpu())"),
                      wrap(torch.Tensor, "numpy", "copy to the host (.numpy())"),
                      wrap(torch.Tensor, "to", "copy to the host (.to(cpu))", only_if=_is_cpu_target),
                      wrap(torch.Tensor, "cuda", "host tensor copied to the device (.cuda())"),
                      wrap(torch, "tensor", "host value copied to the device (torch.tensor)"),
                      wrap(torch, "as_tensor", "host value copied to the device (torch.as_tensor)"),
                      wrap(torch.Tensor, "new_tensor", "host value copied to the device (new_tensor)")):
            stack.enter_context(patch)
        with counter:
            yield counter


# ------------------------------------------------------------------------------------------------ the counter

class _ItemInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * (2 if grad.sum().item() else 0)


def test_counter_catches_each_kind_of_sync():
    x = torch.randn(6, 3)
    mask = x[:, 0] > 0
    cases = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "if tensor": lambda: 1 if (x > 5).any() else 0,
        "int": lambda: int(x[0, 0]),
        "float": lambda: float(x[0, 0]),
        "boolean index": lambda: x[mask],
        "boolean index in a tuple": lambda: x[mask, 1:],
        "boolean assignment": lambda: x.clone().__setitem__(mask, 0.0),
        "nonzero": lambda: torch.nonzero(mask),
        "nonzero method": lambda: mask.nonzero(),
        "where(cond)": lambda: torch.where(mask),
        "masked_select": lambda: x.masked_select(mask[:, None]),
        "unique": lambda: torch.unique(mask),
        "tolist": lambda: x.tolist(),
        "cpu": lambda: x.cpu(),
        "numpy": lambda: x.numpy(),
        "to cpu": lambda: x.to("cpu"),
        "equal": lambda: torch.equal(x, x),
        "repeat_interleave by tensor": lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3])),
        "host tensor": lambda: torch.tensor(3.0),
        "item in backward": lambda: _ItemInBackward.apply(x.clone().requires_grad_()).sum().backward(),
    }
    for name, fn in cases.items():
        with count_host_syncs() as syncs:
            fn()
        assert syncs.count >= 1, name
    with count_host_syncs() as syncs:
        x.sum().item()
    assert syncs.count == 1 and "test_sync.py" in syncs.events[0][1]  # names this line, not torch's wrapper


def test_counter_ignores_device_side_work():
    x = torch.randn(6, 3, requires_grad=True)
    keys = torch.rand(6)
    with count_host_syncs() as syncs:
        y = x[keys.topk(4).indices] * (keys[:4, None] > 0.5)  # integer indexing, a mask as a 0/1 factor
        y = torch.where(keys[:4, None] > 0.2, y, 0.0).sum() + torch.arange(3).repeat_interleave(2).sum()
        y.backward()
        torch.full((2,), 7.0).add_(1)
    assert syncs.count == 0, syncs.report()
