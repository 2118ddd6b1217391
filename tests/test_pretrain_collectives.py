"""Every collective medfm issues goes through medfm.pretrain.collectives, which obeys NCCL's rules.

CPU/gloo accepts a collective on any tensor, so a CPU test run cannot see a tensor that NCCL would refuse. Here
torch.distributed is replaced by a fake that *claims* the NCCL backend and refuses what NCCL refuses: a tensor that
is not on the backend's CUDA device ("No backend type associated with device type cpu") and a bool reduction.
"Being on CUDA" is emulated on a CPU-only host: inside ``FakeCuda`` a ``.to(cuda)`` returns a CPU tensor of the
marker class ``_OnFakeCuda`` (and ``.to(cpu)`` drops the marker), so the fake can tell a tensor that was placed on
the backend's device from one that was handed over as it was. The fake emulates a world of two identical ranks
(SUM doubles, gathers repeat).
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from medfm.pretrain import collectives

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "barrier", "gather", "scatter", "all_gather_object", "gather_object",
               "broadcast_object_list", "scatter_object_list", "all_to_all", "all_to_all_single", "send", "recv",
               "isend", "irecv", "monitored_barrier"}


# -- the source walk ---------------------------------------------------------------------------------------------
def _collective_calls(path: Path) -> list[str]:
    """``file:line name`` of each torch.distributed collective called (or imported by name) in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed":
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed"
                                                                                 for a in node.names):
            aliases.update(a.asname or a.name for a in node.names if a.name == "distributed")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names if a.name in COLLECTIVES]
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and ast.unparse(node.value) in aliases:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_only_collectives_module_calls_collectives():
    skip = {"tests", "benchmarks", ".venv", ".venv-peers", "docs", "configs", "build"}
    files = [p for p in ROOT.rglob("*.py") if not (set(p.relative_to(ROOT).parts) & skip)
             and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    assert any(p.name == "train.py" for p in files)  # the walk sees the package
    found = [hit for p in files if p != ROOT / "pretrain" / "collectives.py" for hit in _collective_calls(p)]
    assert found == [], "collectives outside medfm.pretrain.collectives:\n" + "\n".join(found)
    assert _collective_calls(ROOT / "pretrain" / "collectives.py")  # the detector does see real calls


# -- the rules (fake NCCL) ---------------------------------------------------------------------------------------
class _OnFakeCuda(torch.Tensor):
    """A CPU tensor standing for one on the backend's CUDA device."""


def _device_arg(args, kwargs):
    for a in list(args[1:]) + [kwargs.get("device")]:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
    return None


class FakeCuda(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.to:
            dev = _device_arg(args, kwargs)
            if dev is not None and dev.type == "cuda":
                args = tuple("cpu" if isinstance(a, (str, torch.device)) else a for a in args)
                if "device" in kwargs:
                    kwargs["device"] = "cpu"
                return func(*args, **kwargs).as_subclass(_OnFakeCuda)
            if dev is not None and dev.type == "cpu" and isinstance(args[0], _OnFakeCuda):
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        return func(*args, **kwargs)


class FakeNccl:
    """torch.distributed as a world of 2 identical ranks on NCCL, refusing what NCCL refuses."""

    def __init__(self):
        self.wire: list[tuple[str, torch.dtype]] = []

    def _check(self, name, t):
        if not isinstance(t, _OnFakeCuda):
            raise RuntimeError(f"{name}: No backend type associated with device type cpu")
        if t.dtype == torch.bool:
            raise RuntimeError(f"{name}: NCCL does not support bool reductions")
        self.wire.append((name, t.dtype))

    def all_reduce(self, t, op=dist.ReduceOp.SUM, group=None, async_op=False):
        self._check("all_reduce", t)
        if op == dist.ReduceOp.SUM:
            t.mul_(2)

    def all_gather(self, parts, t, group=None, async_op=False):
        self._check("all_gather", t)
        for p in parts:
            self._check("all_gather(out)", p)
            p.copy_(t)

    def all_gather_object(self, out, obj, group=None):
        out[:] = [obj] * len(out)

    def broadcast_object_list(self, box, src=0, group=None):
        pass

    def barrier(self, group=None, async_op=False, device_ids=None):
        if device_ids is None:  # NCCL would guess a device from the rank (and can hang on the wrong one)
            raise RuntimeError("barrier: NCCL barrier without device_ids")
        self.wire.append(("barrier", None))


@pytest.fixture
def nccl(monkeypatch):
    fake = FakeNccl()
    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast_object_list", "barrier"):
        monkeypatch.setattr(dist, name, getattr(fake, name))
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(collectives, "device", lambda group=None: torch.device("cuda", 0))
    with FakeCuda():
        yield fake


def test_every_collective_is_placed_for_nccl(nccl):
    flags = collectives.all_reduce(torch.tensor([True, False]), "max")
    assert flags.dtype == torch.bool and type(flags) is torch.Tensor and flags.tolist() == [True, False]
    assert collectives.any_flags([False, True]) == [False, True]
    assert collectives.reduce_floats([1.5, 2**40 + 1]) == [3.0, 2 * (2**40 + 1)]  # float64 on the wire, exact
    g = collectives.all_gather(torch.tensor([True, False]))
    assert [p.tolist() for p in g] == [[True, False]] * 2 and all(p.dtype == torch.bool for p in g)
    assert collectives.sum_counts({"bad_npy": 3}) == {"bad_npy": 6}
    t = torch.ones(3)
    assert collectives.all_reduce_(t) is t and t.tolist() == [2.0] * 3
    collectives.barrier()
    assert ("all_reduce", torch.uint8) in nccl.wire and ("all_gather", torch.uint8) in nccl.wire
    assert ("all_reduce", torch.float64) in nccl.wire and ("barrier", None) in nccl.wire


def test_train_micro_step_flags_reach_nccl_on_device(nccl):
    from medfm.pretrain.train import _micro_step

    class Eng:
        def forward(self, batch, plan):
            losses = {"a": torch.tensor(1.0), "b": torch.tensor(float("nan"))}
            return losses, losses["a"] * 2, {"image": 4}

        def backward(self, total):
            self.total = float(total)

    eng = Eng()
    names, vals, tok, bad = _micro_step(eng, {}, None, False)
    assert names == ["a", "b"] and bad == ["b"] and math.isnan(eng.total) and vals.device.type == "cpu"
    assert ("all_reduce", torch.uint8) in nccl.wire


def test_train_step_totals_reach_nccl_on_device(nccl):
    from medfm.pretrain.train import reduce_step_totals

    losses, tokens, flops = reduce_step_totals({"clip": 0.5, "mae": 1.0}, 10, 1e15, world=2)
    assert losses == {"clip": 0.5, "mae": 1.0} and tokens == 20 and flops == 2e15
    assert nccl.wire == [("all_reduce", torch.float64)]


def test_zero3_grad_norms_reach_nccl_on_device(nccl, monkeypatch):
    import deepspeed.utils

    from medfm.pretrain.engine import Engine

    monkeypatch.setattr(deepspeed.utils, "safe_get_local_grad", lambda p: p.grad)
    eng = Engine.__new__(Engine)
    eng.strategy, eng.world_size = "zero3", 2
    eng.module = torch.nn.Linear(2, 1)
    eng.module.weight.grad = torch.tensor([[3.0, 4.0]])
    eng.module.bias.grad = torch.tensor([0.0])
    norms = eng.grad_norms()
    assert norms["weight"] == pytest.approx(5.0 * math.sqrt(2))  # two disjoint partitions of equal norm
    assert nccl.wire == [("all_reduce", torch.float64)]


def test_loss_gathers_reach_nccl_on_device(nccl):
    from medfm.pretrain.losses import _GatherWithGrad, gather_features, gather_mask, global_count

    x = torch.randn(3, 4, requires_grad=True)
    y = gather_features(x, gather_with_grad=True)
    assert y.shape == (6, 4) and torch.equal(y[3:], x.detach()) and type(y) is torch.Tensor
    # The backward is called directly: the autograd engine does not carry the FakeCuda mode into it.
    grad, _ = _GatherWithGrad.backward(SimpleNamespace(group=None, rows=3), torch.ones(6, 4))
    assert torch.equal(grad, torch.full((3, 4), 2.0)) and type(grad) is torch.Tensor  # summed over 2 ranks
    assert gather_features(x, gather_with_grad=False).shape == (6, 4)
    assert gather_mask(torch.tensor([True, False])).tolist() == [True, False, True, False]
    assert float(global_count(torch.tensor(3))) == 6.0


def test_checkpoint_barrier_names_its_device(nccl):
    from medfm.pretrain.checkpoint import _barrier

    _barrier()
    assert nccl.wire == [("barrier", None)]


def test_loader_counters_refuse_a_world_without_a_gather():
    from medfm.shards.loader import ShardLoader

    loader = ShardLoader.__new__(ShardLoader)
    from medfm.shards.corrupt import SkipCounters

    loader.counters, loader.world_size = SkipCounters({"bad_npy": 2}), 2
    with pytest.raises(ValueError, match="gather_objects"):
        loader.all_counters()
    assert loader.all_counters(gather_objects=lambda obj: [obj, {"bad_npy": 1}]) == {"bad_npy": 3}
