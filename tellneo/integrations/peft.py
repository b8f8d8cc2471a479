"""Drop-in for PEFT: route the forward of PEFT ``lora.Linear`` layers through :func:`tellneo.ops.lora_linear`.

``patch(model)`` sets an instance-level ``forward`` on every supported ``peft.tuners.lora.Linear`` in ``model``
(nothing global is rebound, nothing happens at import time) and returns a :class:`PatchReport`;
``unpatch(model)`` removes it again. A layer is patched when its configuration is one the fused op computes
exactly:

* a plain ``nn.Linear`` base layer (no quantised/hooked/overridden base), not ``fan_in_fan_out``;
* vanilla LoRA for its adapters: no DoRA or other PEFT variant (``layer.lora_variant``), no ``lora_bias``,
  a plain number as ``layer.scaling[adapter]``;
* ``lora_dropout`` is ``nn.Dropout`` or ``nn.Identity``.

LoRA options that are vanilla LoRA at forward time are fused and give PEFT's result: rsLoRA (``use_rslora=True``
only sets ``scaling[adapter] = alpha / sqrt(r)``; the fused op is given the layer's ``scaling`` on every call,
never a recomputed ``alpha / r``), ``rank_pattern`` / ``alpha_pattern``, and the initialisations (PiSSA,
``pissa_niter_N``, OLoRA, Gaussian, ...), which only change the initial adapter and base weights that the op reads
from the layer. DoRA layers, and any other PEFT LoRA variant, are left on PEFT's forward and listed with the
reason in ``report.skipped`` (``report.not_fused()`` adds the per-call fallbacks below).

Per call, the patched forward still falls back to PEFT's own forward (exactly PEFT's result) whenever the
layer's state is outside what the op computes: adapters disabled or merged, not exactly one active adapter,
mixed-adapter batches (``adapter_names=``), extra forward arguments, tensors on different devices, or
input/base/adapter dtypes that differ outside ``torch.autocast``.
Dropout follows the dropout module's ``training`` flag, so ``model.eval()`` turns it off.

The report is truthful about what runs: layers whose base and adapter dtypes differ (a bf16 model with PEFT's
fp32 adapters) are listed in ``report.autocast_only`` at patch time (fused only under ``torch.autocast``), and the
first forward of the patched model records, per layer, whether it ran fused or fell back to PEFT and why
(``report.first_forward``), logging one summary line when any layer fell back.

Because PEFT's own modules, parameters and state dict are untouched, ``merge_and_unload``, ``save_pretrained``
/ ``load_adapter``, ``set_adapter``, gradient checkpointing and the HF ``Trainer`` behave as without the patch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tellneo._backend import log_once
from tellneo.ops.lora_linear import lora_linear

__all__ = ["PatchReport", "patch", "unpatch", "is_patched"]

logger = logging.getLogger("tellneo")

_MARK = "_tellneo_lora_patch"  # instance attribute holding the patch's state (its presence = patched)


@dataclass
class PatchReport:
    """What :func:`patch` did: qualified module names patched, and the LoRA layers left alone with the reason."""

    patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    backend: str = "auto"
    #: patched layers whose base and adapter dtypes differ: fused only under torch.autocast (else PEFT's forward)
    autocast_only: dict[str, str] = field(default_factory=dict)
    #: filled by each patched layer's first forward: None = ran fused, else why PEFT's forward ran instead
    first_forward: dict[str, str | None] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.patched)

    def fell_back(self) -> dict[str, str]:
        """Layers whose first forward ran PEFT's forward instead of the fused op, with the reason."""
        return {name: reason for name, reason in self.first_forward.items() if reason is not None}

    def not_fused(self) -> dict[str, str]:
        """Every LoRA layer known to run PEFT's forward, with the reason: the layers left alone at patch time
        (``skipped``, e.g. DoRA adapters) and the patched layers whose first forward fell back (``fell_back()``)."""
        return {**self.skipped, **self.fell_back()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counts for run summaries: ``patched``, ``not_fused`` (layer count) and ``not_fused_reasons``
        (reason -> layer count), ``autocast_only`` (layer count), ``backend``."""
        reasons: dict[str, int] = {}
        for reason in self.not_fused().values():
            reasons[reason] = reasons.get(reason, 0) + 1
        return {"backend": self.backend, "patched": len(self.patched), "not_fused": len(self.not_fused()),
                "not_fused_reasons": reasons, "autocast_only": len(self.autocast_only)}

    def summary(self) -> str:
        lines = [f"tellneo.peft.patch: {len(self.patched)} LoRA linear layer(s) patched (backend={self.backend})"]
        if self.autocast_only:
            kinds = sorted(set(self.autocast_only.values()))
            lines.append(f"{len(self.autocast_only)} of them fuse only under torch.autocast ({'; '.join(kinds)}): "
                         "without autocast they run PEFT's forward")
        if self.first_forward:
            fell = self.fell_back()
            lines.append(f"first forward: {len(self.first_forward) - len(fell)} ran fused, {len(fell)} ran PEFT's "
                         "forward" + (":" if fell else ""))
            lines += [f"  {name}: {reason}" for name, reason in fell.items()]
        if self.skipped:
            lines.append(f"{len(self.skipped)} LoRA layer(s) left to PEFT:")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def _lora_linear_cls() -> type:
    from peft.tuners.lora.layer import Linear

    return Linear


def _is_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # peft not installed: nothing to patch
        return False
    return isinstance(module, LoraLayer)


def _static_reason(module: nn.Module) -> str | None:
    """Why this LoRA layer cannot be fused at all (None if it can)."""
    linear_cls = _lora_linear_cls()
    if not isinstance(module, linear_cls):
        return f"{type(module).__name__} is not a peft lora.Linear"
    if type(module).forward is not linear_cls.forward:
        return f"{type(module).__name__} overrides lora.Linear.forward"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D base) is not supported"
    base = module.get_base_layer()
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return f"base layer {type(base).__name__} is not a plain nn.Linear"
    if "forward" in vars(base) or base._forward_hooks or base._forward_pre_hooks:
        return "base layer has forward hooks or an instance-level forward"
    if not base.weight.dtype.is_floating_point:
        return f"base weight dtype {base.weight.dtype} is not floating point"
    for adapter in module.lora_A:
        reason = _adapter_reason(module, adapter)
        if reason is not None:
            return reason
    return None


def _adapter_reason(module: nn.Module, adapter: str) -> str | None:
    """Why ``adapter`` of this layer is not plain LoRA (None if it is). rsLoRA and the initialisations (PiSSA,
    OLoRA, LoftQ, ...) are plain LoRA at forward time: they change only ``scaling[adapter]`` (read per call) and the
    initial weights (read from the layer), so they are fused."""
    if module.use_dora.get(adapter, False):
        return f"adapter {adapter!r} uses DoRA (magnitude-normalised weight, not computed by the fused op)"
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        name = variant.__name__ if isinstance(variant, type) else type(variant).__name__
        return f"adapter {adapter!r} uses the LoRA variant {name} (not computed by the fused op)"
    if getattr(module, "lora_bias", {}).get(adapter, False):
        return f"adapter {adapter!r} has lora_bias=True"
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_a.bias is not None \
            or lora_b.bias is not None:
        return f"adapter {adapter!r} has non-standard lora_A/lora_B modules (a bias or a subclass)"
    scaling = module.scaling.get(adapter)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        return f"adapter {adapter!r} scaling is {type(scaling).__name__}, not a number"
    drop = module.lora_dropout[adapter]
    if type(drop) not in (nn.Dropout, nn.Identity):
        return f"adapter {adapter!r} dropout is {type(drop).__name__}, not nn.Dropout/nn.Identity"
    return None


def _call_reason(module: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """Why this particular call must go through PEFT's forward (None if the fused op computes it)."""
    if args or any(v is not None for v in kwargs.values()):
        return "extra forward arguments (e.g. adapter_names)"
    if module.disable_adapters:
        return "adapters are disabled"
    if module.merged:
        return "adapter weights are merged into the base layer"
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return f"{len(active)} active LoRA adapters (the fused op handles exactly one)"
    reason = _adapter_reason(module, active[0])
    if reason is not None:
        return reason
    base = module.get_base_layer()
    tensors = [x, base.weight, module.lora_A[active[0]].weight, module.lora_B[active[0]].weight]
    if base.bias is not None:
        tensors.append(base.bias)
    if len({t.device for t in tensors}) != 1:
        return "input, base and adapter weights are on different devices"
    # Under autocast the op casts everything to the autocast dtype, which is also what PEFT's layers compute in.
    if len({t.dtype for t in tensors}) != 1 and not torch.is_autocast_enabled(x.device.type):
        return f"mixed dtypes {sorted({str(t.dtype) for t in tensors})} (PEFT casts between them)"
    return None


def _fused_forward(module: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    state = vars(module).get(_MARK)
    if state is None:  # unpatched while someone else's wrapper still holds this forward: behave like PEFT
        return type(module).forward(module, x, *args, **kwargs)
    reason = _call_reason(module, x, args, kwargs)
    if state["name"] not in state["report"].first_forward:
        state["report"].first_forward[state["name"]] = reason
    if reason is not None:
        log_once(("peft.patch", reason), f"tellneo.peft: PEFT forward used for some calls: {reason}")
        return state["original"](x, *args, **kwargs)
    adapter = next(a for a in module.active_adapters if a in module.lora_A)
    base = module.get_base_layer()
    drop = module.lora_dropout[adapter]
    p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
    return lora_linear(
        x,
        base.weight,
        module.lora_A[adapter].weight,
        module.lora_B[adapter].weight,
        float(module.scaling[adapter]),
        bias=base.bias,
        dropout_p=p,
        backend=state["backend"],
    )


class _PatchedForward:
    """Picklable, deep-copyable bound forward (a ``functools.partial``-like callable that keeps the module)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _fused_forward(self.module, x, *args, **kwargs)


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` currently has the fused forward installed by :func:`patch`."""
    return _MARK in vars(module)


def patch(model: nn.Module, *, backend: str = "auto") -> PatchReport:
    """Fuse every supported PEFT ``lora.Linear`` in ``model``; returns what was patched and what was not (logged
    once). Idempotent; reverse with :func:`unpatch`. ``backend`` is passed to :func:`tellneo.ops.lora_linear`.
    """
    report = PatchReport(backend=backend)
    for name, module in model.named_modules():
        if not _is_lora_layer(module):
            continue
        if is_patched(module):
            vars(module)[_MARK].update(report=report, name=name)
        else:
            reason = _static_reason(module)
            if reason is not None:
                report.skipped[name] = reason
                continue
            original_instance_forward = vars(module).get("forward")
            setattr(
                module,
                _MARK,
                {"backend": backend, "original": module.forward, "instance_forward": original_instance_forward,
                 "report": report, "name": name},
            )
            module.forward = _PatchedForward(module)
        report.patched.append(name)
        dtypes = _dtype_mismatch(module)
        if dtypes is not None:
            report.autocast_only[name] = dtypes
    _watch_first_forward(model, report)
    if report.skipped or report.autocast_only:
        logger.warning(report.summary())
    else:
        logger.info(report.summary())
    return report


def _dtype_mismatch(module: nn.Module) -> str | None:
    """``"base bfloat16, adapters float32"`` when base and adapter weights differ in dtype (None if they agree)."""
    base = module.get_base_layer().weight.dtype
    adapters = sorted({str(p.dtype).replace("torch.", "") for a in module.lora_A
                       for p in (module.lora_A[a].weight, module.lora_B[a].weight)})
    if adapters == [str(base).replace("torch.", "")]:
        return None
    return f"base {str(base).replace('torch.', '')}, adapters {'/'.join(adapters)}"


_WATCH = "_tellneo_lora_first_forward"  # root-module attribute: the hook handle logging the first forward


class _FirstForwardWatch:
    """Forward hook on the patched root: after its first forward, log which patched layers ran fused, then remove
    itself. A class, not a closure, so the model stays picklable and deep-copyable."""

    def __init__(self, model: nn.Module, report: PatchReport) -> None:
        self.model, self.report = model, report

    def __call__(self, _module: nn.Module, _args: Any, _out: Any) -> None:
        handle = vars(self.model).pop(_WATCH, None)
        if handle is not None:
            handle.remove()
        if self.report.fell_back():
            logger.warning(self.report.summary())
        else:
            logger.info("tellneo.peft: first forward: all %d patched LoRA layer(s) ran fused",
                        len(self.report.first_forward))


def _watch_first_forward(model: nn.Module, report: PatchReport) -> None:
    old = vars(model).pop(_WATCH, None)
    if old is not None:
        old.remove()
    if report.patched:
        setattr(model, _WATCH, model.register_forward_hook(_FirstForwardWatch(model, report)))


def unpatch(model: nn.Module) -> list[str]:
    """Restore PEFT's forward on every layer :func:`patch` fused; returns the names restored."""
    restored = []
    watch = vars(model).pop(_WATCH, None)
    if watch is not None:
        watch.remove()
    for name, module in model.named_modules():
        if not is_patched(module):
            continue
        state = vars(module).pop(_MARK)
        current = vars(module).get("forward")
        if isinstance(current, _PatchedForward) and current.module is module:
            if state["instance_forward"] is not None:
                module.forward = state["instance_forward"]
            else:
                del module.forward
        else:
            # Another wrapper (e.g. an accelerate hook) was installed over ours: leave it in place; our forward
            # inside it now defers to PEFT's because the mark is gone.
            logger.warning("tellneo.peft.unpatch: %s: forward was re-wrapped after patch(); left in place", name)
        restored.append(name)
    return restored
