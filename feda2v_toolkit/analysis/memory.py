"""Peak memory of torch code, measured on fake tensors: nothing is allocated, nothing is computed.

:class:`MemoryTracker` is a dispatch mode that sees every tensor an operator returns. It counts each
distinct storage once (views and in-place results share their input's storage), adds its bytes while the
storage is alive and subtracts them when the storage is freed, and records the peak. Run under
:func:`fake_tensors` (torch's ``FakeTensorMode``: tensors with shapes, dtypes and a device but no data),
the generator's own ``from_config``, ``configure_optimizers`` and ``training_step`` run unchanged --
autocast, fused optimisers and gradient clipping included -- at the cost of shape propagation only. The
peak therefore includes weights, gradients, optimiser state, the batch, activations saved for backward
and the temporaries live at the worst moment. :class:`SavedTensors` counts the activations on their own
(what autograd saves for backward, parameters excluded).

What it does not see: the allocator's rounding and caching, math-library scratch buffers and the
Python/torch runtime itself (about 300 MiB on CPU). ``tests/analysis/test_plan.py`` checks the
simulated peak of a real VAE and GAN step against the measured peak RSS of a subprocess.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_SCALAR = torch.ops.aten._local_scalar_dense.default


class MemoryTracker(TorchDispatchMode):
    """Counts live tensor storages; ``current`` and ``peak`` are in bytes.

    Fake tensors hold no values, so ``.item()`` (``_local_scalar_dense``) answers for them: ``0.0`` for
    floating-point tensors (loss values being logged), ``1`` for integer and ``True`` for boolean ones
    (data-dependent checks such as "is this component fitted?" take the ordinary path).
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        n = int(storage.nbytes())
        self._live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        n = self._live.pop(key, None)
        if n is not None:
            self.current -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is _SCALAR:
            dtype = args[0].dtype
            return True if dtype == torch.bool else (0.0 if dtype.is_floating_point or dtype.is_complex else 1)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


@contextlib.contextmanager
def fake_tensors() -> Iterator[MemoryTracker]:
    """Run a block on fake CPU tensors under a fresh :class:`MemoryTracker` (yielded)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker = MemoryTracker()
    with FakeTensorMode(allow_non_fake_inputs=False), tracker:
        yield tracker


class SavedTensors:
    """Bytes of the distinct tensors autograd saves for backward (activations), parameters excluded.

    Use as ``with SavedTensors(model.parameters()) as saved: ...``; ``saved.bytes`` is the total over the
    block, ``saved.peak_step`` the largest per-:meth:`step` total.
    """

    def __init__(self, exclude: Any = ()) -> None:
        self._exclude = {t.untyped_storage()._cdata for t in exclude}
        self._seen: dict[int, int] = {}
        self.peak_step = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st._cdata not in self._exclude:
            self._seen[st._cdata] = int(st.nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def step(self) -> None:
        """Close one step: remember its total and start counting afresh."""
        self.peak_step = max(self.peak_step, self.bytes)
        self._seen.clear()

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages among ``tensors`` (an iterable of tensors or None)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st._cdata] = int(st.nbytes())
    return sum(seen.values())


def optimizer_state_bytes(optimizers: Any) -> int:
    """Bytes of every optimiser's per-parameter state (e.g. AdamW's two moment buffers)."""
    return tensor_bytes(v for opt in optimizers for state in opt.state.values() for v in state.values())
