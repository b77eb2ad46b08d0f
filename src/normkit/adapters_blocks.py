""":func:`normkit.convert`'s built-in adapters for the norms of today's blocks, whose forward
takes more than the input: gated RMSNorms (HF's ``MambaRMSNormGated`` and its copies in Bamba,
Falcon-H1, Zamba2, NemotronH, ...: ``forward(hidden_states, gate=None)``) become
:class:`normkit.GatedRMSNorm`; diffusers' adaLN layers (``AdaLayerNormZero`` of DiT and SD3,
``AdaLayerNormZeroSingle`` of Flux, ``SD35AdaLayerNormZeroX`` of SD3.5, ``AdaLayerNormContinuous``
of SD3/Flux's output) become an
adapter below that keeps their submodules (the same ``linear``, ``silu``, ``emb`` and ``norm``
objects, so the ``state_dict`` keys are unchanged) and modulates through one
:func:`normkit.functional.modulated_layer_norm` (or ``modulated_rms_norm``) call.

Each adapter is a :class:`~normkit._structure.Candidate` with its own probes (the gate, the
conditioning embedding): convert keeps it only where it agrees with the module on them, outputs
and gradients. diffusers is never imported: its classes are recognised by module and name.

Not adapted, because the norm is applied inside a forward that is not the norm's: the QK norms
of Qwen3/Gemma3 (``q_norm``/``k_norm``, each already an RMSNorm that convert turns into
:class:`normkit.RMSNorm`), Gemma's post-attention + pre-feedforward pair, and PixArt's
``norm1`` + inline ``scale_shift_table`` modulation: fusing those needs the attention or block
forward rewritten.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._probe import probe_inputs, tensor_home
from ._structure import Candidate, Probe, _eps, _like, _share, _tensor
from .functional_blocks import modulated_layer_norm, modulated_rms_norm
from .modules._base import BackendMixin
from .modules.blocks import GatedRMSNorm

__all__ = [
    "AdaLayerNormContinuousAdapter",
    "AdaLayerNormZeroAdapter",
    "AdaLayerNormZeroSingleAdapter",
    "SD35AdaLayerNormZeroXAdapter",
    "block_candidates",
]


def _rows(features: int, device: torch.device, dtype: torch.dtype, rank: int | None = None) -> list[tuple[str, Tensor]]:
    """The probe inputs with the features last (every rank, or only ``rank``)."""
    stand_in = nn.RMSNorm(features, device="meta")
    return [(label, x) for label, x in probe_inputs(stand_in, device, dtype)
            if x.shape[-1] == features and (rank is None or x.dim() == rank)]


def _random(shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(device=device, dtype=dtype)


def _flat(out: Tensor | tuple[Tensor, ...]) -> Tensor:
    """A forward's results as one tensor, so the probe compares them all at once."""
    return out if isinstance(out, Tensor) else torch.cat([t.reshape(-1) for t in out])


# ---- gated RMSNorm ------------------------------------------------------------------------------


def _ranks_taken(m: nn.Module, rows: list[tuple[str, Tensor]]) -> set[int]:
    """The ranks of ``rows`` whose first input ``m`` computes without an error. Gated norms are
    often written for the shapes of their model alone (Falcon-H1's ``FalconH1RMSNormGated``
    unpacks ``(N, L, D)`` or ``(N, D)``): an input of another rank never reaches them there, so it
    is no evidence for or against a replacement."""
    taken = set()
    for rank in sorted({x.dim() for _, x in rows}):
        x = next(x for _, x in rows if x.dim() == rank)
        try:
            with torch.no_grad():
                m.forward(x)  # (not m(x): a user's hooks must not see the probe)
        except Exception:  # noqa: BLE001 - any refusal: the module does not take this rank
            continue
        taken.add(rank)
    return taken


def _gated_probes(m: nn.Module) -> list[Probe]:
    """Each features-last probe input without a gate, with one, and with the gate varied (its
    gradient compared), of the ranks the module takes (every rank when it takes none of them:
    the probe then reports its error)."""
    device, dtype = tensor_home(m)
    rows = _rows(m.weight.shape[0], device, dtype)
    taken = _ranks_taken(m, rows)
    rows = [(label, x) for label, x in rows if x.dim() in taken] or rows
    probes = []
    for seed, (label, x) in enumerate(rows):
        gate = _random(tuple(x.shape), 100 + seed, device, dtype)
        probes += [Probe(f"{label} without a gate", x, lambda f, t: f(t)),
                   Probe(f"{label} with a gate", x, lambda f, t, g=gate: f(t, g)),
                   Probe(f"{label}, the gate varied", gate, lambda f, g, x=x: f(x, g))]
    return probes


def _carry_attributes(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` given the plain public attributes (numbers, strings) of ``old`` it lacks: model
    code may read them from the norm without calling it (HF Mamba2's training path passes
    ``norm.weight`` and ``norm.variance_epsilon`` to a fused kernel). They are copies: set the
    normkit module's own attributes (``eps``) to change what it computes."""
    for name, value in vars(old).items():
        if not name.startswith("_") and isinstance(value, (bool, int, float, str)) and not hasattr(new, name):
            setattr(new, name, value)
    return new


def _gated_candidates(m: nn.Module) -> list[Candidate]:
    """GatedRMSNorm for a norm whose forward takes a ``gate``, with a 1-D ``weight`` and an eps;
    ``group_size`` from its attribute, or from ``n_groups`` (one group without either), both gate
    placements and casts: the probe decides."""
    weight, (found, eps) = _tensor(m, "weight"), _eps(m)
    if weight is None or weight.dim() != 1 or not found or eps is None:
        return []  # read first: convert asks this of every module of a model
    try:
        if "gate" not in inspect.signature(m.forward).parameters:
            return []
    except (TypeError, ValueError):
        return []
    size = weight.shape[0]
    group = getattr(m, "group_size", None)
    groups = getattr(m, "n_groups", None)  # Falcon-H1 names the number of groups instead
    if group is None and isinstance(groups, int) and not isinstance(groups, bool) and groups > 0 \
            and size % groups == 0:
        group = size // groups
    group = group if isinstance(group, int) and not isinstance(group, bool) and group > 0 and size % group == 0 \
        else None

    def make(cast: str, before: bool) -> Callable[[nn.Module], nn.Module]:
        return lambda m: _carry_attributes(_share(GatedRMSNorm(size, eps, group, before, cast=cast, **_like(m)), m,
                                                  ("weight",)), m)

    return [Candidate(f"GatedRMSNorm(norm_before_gate={before}, cast={cast!r})", make(cast, before), _gated_probes)
            for cast in ("normalize_first", "weight_first") for before in (False, True)]


# ---- diffusers' adaLN layers --------------------------------------------------------------------


class _ModulatedAdapter(BackendMixin, nn.Module):
    """What the adaLN adapters share: ``original``'s submodules (the same objects) and the
    modulated norm of ``norm``'s parameters and eps (``rms``: RMS normalization)."""

    def __init__(self, original: nn.Module, rms: bool) -> None:
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.rms = rms
        self._init_backend(None)
        self.train(original.training)

    def modulate(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        """``norm(x) * (1 + scale) + shift`` in one normkit call."""
        weight, eps = getattr(self.norm, "weight", None), self.norm.eps
        if self.rms:
            return modulated_rms_norm(x, shift, scale, weight, eps, **self.call_options())
        return modulated_layer_norm(x, shift, scale, weight, getattr(self.norm, "bias", None), eps,
                                    **self.call_options())

    def extra_repr(self) -> str:
        text = f"rms={self.rms}"
        options = super().extra_repr()
        return f"{text}, {options}" if options else text


class AdaLayerNormZeroAdapter(_ModulatedAdapter):
    """diffusers' ``AdaLayerNormZero`` (DiT, SD3): six modulations from ``linear(silu(emb))``
    (``emb`` from the layer's own timestep + class embedding when it has one); the first shift
    and scale modulate ``norm(x)``; returns ``(x, gate_msa, shift_mlp, scale_mlp, gate_mlp)``."""

    def __init__(self, original: nn.Module, rms: bool = False) -> None:
        super().__init__(original, rms)
        if "emb" not in self._modules:
            self.emb = None

    def forward(self, x: Tensor, timestep: Tensor | None = None, class_labels: Tensor | None = None,
                hidden_dtype: torch.dtype | None = None, emb: Tensor | None = None) -> tuple[Tensor, ...]:
        if self.emb is not None:
            emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
        shift, scale, *rest = self.linear(self.silu(emb)).chunk(6, dim=1)
        return (self.modulate(x, shift.unsqueeze(1), scale.unsqueeze(1)), *rest)


class SD35AdaLayerNormZeroXAdapter(_ModulatedAdapter):
    """diffusers' ``SD35AdaLayerNormZeroX`` (SD3.5's dual-attention blocks): nine modulations;
    the norm of ``hidden_states`` modulated twice (two normkit calls, each fused); returns
    ``(x, gate_msa, shift_mlp, scale_mlp, gate_mlp, x2, gate_msa2)``."""

    def forward(self, hidden_states: Tensor, emb: Tensor | None = None) -> tuple[Tensor, ...]:
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp, shift2, scale2, gate2 = \
            self.linear(self.silu(emb)).chunk(9, dim=1)
        x = self.modulate(hidden_states, shift.unsqueeze(1), scale.unsqueeze(1))
        x2 = self.modulate(hidden_states, shift2.unsqueeze(1), scale2.unsqueeze(1))
        return x, gate, shift_mlp, scale_mlp, gate_mlp, x2, gate2


class AdaLayerNormZeroSingleAdapter(_ModulatedAdapter):
    """diffusers' ``AdaLayerNormZeroSingle`` (Flux's single-stream blocks): shift, scale and
    gate from ``linear(silu(emb))``; returns ``(x, gate)``."""

    def forward(self, x: Tensor, emb: Tensor | None = None) -> tuple[Tensor, Tensor]:
        shift, scale, gate = self.linear(self.silu(emb)).chunk(3, dim=1)
        return self.modulate(x, shift.unsqueeze(1), scale.unsqueeze(1)), gate


class AdaLayerNormContinuousAdapter(_ModulatedAdapter):
    """diffusers' ``AdaLayerNormContinuous`` (SD3/Flux's output norm): scale then shift from
    ``linear(silu(conditioning_embedding))``, the activation cast to ``x``'s dtype first."""

    def forward(self, x: Tensor, conditioning_embedding: Tensor) -> Tensor:
        scale, shift = self.linear(self.silu(conditioning_embedding).to(x.dtype)).chunk(2, dim=1)
        return self.modulate(x, shift.unsqueeze(1), scale.unsqueeze(1))


def _norm_size(norm: nn.Module) -> tuple[int, ...]:
    """The normalized shape of an adaLN layer's norm (torch's ``normalized_shape``, diffusers
    RMSNorm's ``dim``)."""
    shape = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None) or ()
    return tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else ()


def _conditioned(m: nn.Module, call: Callable[[Callable[..., Any], Tensor, Tensor], Any],
                 conditions: int) -> list[Probe]:
    """Probes of an adaLN layer called as ``call(forward, x, cond)`` with ``cond`` of shape
    ``(N, conditions)``: ``x`` varied on each features-last (N, L, D) probe input, then ``cond``."""
    device, dtype = tensor_home(m)
    probes = []
    for seed, (label, x) in enumerate(_rows(_norm_size(m.norm)[0], device, dtype, rank=3)):
        cond = _random((x.shape[0], conditions), 200 + seed, device, dtype)
        probes += [Probe(label, x, lambda f, t, c=cond: _flat(call(f, t, c))),
                   Probe(f"{label}, the conditioning varied", cond, lambda f, c, x=x: _flat(call(f, x, c)))]
    return probes


def _zero_probes(m: nn.Module) -> list[Probe]:
    if getattr(m, "emb", None) is None:
        return _conditioned(m, lambda f, x, c: f(x, emb=c), m.linear.in_features)
    # Its own embedding of timesteps and class labels: those are integers or held fixed, so only
    # x varies (the embedding's parameters' gradients are compared all the same).
    classes = m.emb.class_embedder.num_classes
    device, dtype = tensor_home(m)
    probes = []
    for label, x in _rows(_norm_size(m.norm)[0], device, dtype, rank=3):
        n = x.shape[0]
        timestep = torch.linspace(1.0, 999.0, n, device=device)
        labels = torch.arange(n, device=device) % classes
        probes.append(Probe(label, x, lambda f, t, s=timestep, c=labels: _flat(f(t, s, c, hidden_dtype=t.dtype))))
    return probes


# diffusers class name -> (adapter, probes)
_ADALN: dict[str, tuple[type[_ModulatedAdapter], Callable[[nn.Module], list[Probe]]]] = {
    "AdaLayerNormZero": (AdaLayerNormZeroAdapter, _zero_probes),
    "AdaLayerNormZeroSingle": (AdaLayerNormZeroSingleAdapter,
                               lambda m: _conditioned(m, lambda f, x, c: f(x, emb=c), m.linear.in_features)),
    "SD35AdaLayerNormZeroX": (SD35AdaLayerNormZeroXAdapter,
                              lambda m: _conditioned(m, lambda f, x, c: f(x, emb=c), m.linear.in_features)),
    "AdaLayerNormContinuous": (AdaLayerNormContinuousAdapter,
                               lambda m: _conditioned(m, lambda f, x, c: f(x, c), m.linear.in_features)),
}


def _adaln_candidates(m: nn.Module) -> list[Candidate]:
    cls = type(m)
    found = _ADALN.get(cls.__name__) if cls.__module__.startswith("diffusers.") else None
    norm = getattr(m, "norm", None)
    if found is None or not isinstance(norm, nn.Module) or not _eps(norm)[0] or len(_norm_size(norm)) != 1:
        return []
    adapter, probes = found
    # Its norm is a LayerNorm (plain or FP32LayerNorm) or diffusers' RMSNorm: the probe tells.
    return [Candidate(f"{adapter.__name__}(rms={rms})", lambda m, rms=rms: adapter(m, rms), probes)
            for rms in (False, True)]


def block_candidates(m: nn.Module) -> list[Candidate]:
    """normkit's built-in adapters that may replace ``m`` (the probe decides), or none."""
    return _adaln_candidates(m) or _gated_candidates(m)
