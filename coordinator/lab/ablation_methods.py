"""What "ablating a decoder layer" means in `fragsim ablate`: four methods, each a context
manager over a loaded model that is left exactly as it was afterwards.

Write x for the residual stream entering layer i and y = x + u for what leaves it (u is the
layer's *update*: its attention and MLP contributions). The methods differ in what the next
layer receives instead of y; the damage they measure differs accordingly, and papers that
"remove a layer" do not all mean the same thing, so every result records its method.

- ``skip``: the layer is deleted and x passes through (y := x, i.e. u := 0). This is what
  ShortGPT and SLEB do when they prune a block, and what tuned-lens'
  ``ablate_layer(method="zero")`` does (its hook returns the layer's *input*). Done by swapping
  the decoder's layer list (`without_layers`), not by a hook, so the layer does not even run.
- ``zero-output``: the layer's output hidden state is overwritten with zeros (y := 0), which is
  what some tools mean by "zero ablation". On a Llama this is not a layer ablation at all: the
  stream stays zero for good, because RMSNorm(0) = 0 and attention and MLP of 0 are 0 when
  they have no biases (Llama has none), so the final norm and the head see 0, every logit is
  0 and the cross-entropy is ln V exactly, whichever layer was zeroed. It is measured to show
  that, and to flag results elsewhere that used it.
- ``mean``: u is replaced by its mean over every position of the eval text (y := x + mean u),
  tuned-lens' ``mean`` in its ``mode="token"``, the only mode that makes sense for one text
  (its batch mode needs several sequences). Like tuned-lens the mean is taken in the same
  forward pass, so with several layers ablated a later layer's mean is of its updates *given*
  the earlier ablations.
- ``resample``: u at each position is replaced by u at another position (y := x + u[π]), π a
  derangement of the positions (no position keeps its own update), drawn as tuned-lens draws
  it (`torch.randperm` until no fixed point) from a generator seeded with ``seed`` when the
  ablation starts, so the same seed and layers give the same numbers.

``mean`` and ``resample`` borrow updates computed at other positions, later ones included, so
a little information about later tokens reaches earlier positions; that can only make those
ablations look milder than a causal replacement would, and it is tuned-lens' choice too.

The non-skip methods are forward hooks on the decoder layers; a decoder layer returns a
tensor in some transformers versions and a tuple (hidden_states, ...) in others, and both are
handled. The hooks are removed when the block ends, also when it raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from protocol.errors import PlanError

METHODS = ("skip", "zero-output", "mean", "resample")
DEFAULT_METHOD = "skip"
DEFAULT_SEED = 0  # of resample's derangements

PER_LAYER_CONFIG_LISTS = ("layer_types", "mlp_layer_types")


def parse_methods(spec: str) -> list[str]:
    """'skip,mean' -> ['skip', 'mean']: ablation methods in the order given, each once."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    expected = f"one of {', '.join(METHODS)}, or several separated by commas"
    if not names:
        raise PlanError("--ablation", spec, expected)
    for name in names:
        if name not in METHODS:
            raise PlanError("--ablation", name, expected)
    return list(dict.fromkeys(names))


# ---- skip: removing layers from a loaded model, and putting them back ----------------------


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder's layer list (`model.<base_model_prefix>.layers`), refused when there is none."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise PlanError(
            "decoder layers of this model", type(model).__name__, "a decoder whose layers are <prefix>.layers"
        )
    return layers


@contextmanager
def without_layers(model: Any, removed: Iterable[int]) -> Iterator[list[int]]:
    """`model` without the decoder layers `removed` while the block runs; yields the kept ones.

    Swaps the layer list, sets num_hidden_layers and the per-layer config lists to the kept
    layers, and renumbers every kept module's `layer_idx` 0..k-1 (so a KV cache, were one used,
    would index a slot per kept layer); all restored afterwards, also when the block raises."""
    layers = decoder_layers(model)
    base = getattr(model, model.base_model_prefix)
    n = len(layers)
    gone = set(removed)
    if not gone <= set(range(n)):
        raise ValueError(f"layers to remove {sorted(gone)}: expected layers of 0-{n - 1}")
    kept = [i for i in range(n) if i not in gone]
    if not kept:
        raise ValueError(f"cannot remove all {n} layers")
    configs = list({id(c): c for c in (model.config, getattr(base, "config", model.config))}.values())
    saved_configs = [
        (config, config.num_hidden_layers, {key: getattr(config, key, None) for key in PER_LAYER_CONFIG_LISTS})
        for config in configs
    ]
    indexed: list[tuple[int, Any, int]] = [  # (layer, a module that knows its layer_idx, that layer_idx)
        (i, module, int(getattr(module, "layer_idx")))  # noqa: B009 (Module.__getattr__ is typed Tensor | Module)
        for i, layer in enumerate(layers)
        for module in layer.modules()
        if isinstance(getattr(module, "layer_idx", None), int)
    ]
    position = {layer: new for new, layer in enumerate(kept)}
    try:
        base.layers = torch.nn.ModuleList([layers[i] for i in kept])
        for config, _, lists in saved_configs:
            config.num_hidden_layers = len(kept)
            for key, value in lists.items():
                if isinstance(value, list) and len(value) == n:
                    setattr(config, key, [value[i] for i in kept])
        for i, module, _ in indexed:
            if i in position:
                module.layer_idx = position[i]
        yield kept
    finally:
        base.layers = layers
        for config, num_layers, lists in saved_configs:
            config.num_hidden_layers = num_layers
            for key, value in lists.items():
                if isinstance(value, list):
                    setattr(config, key, value)
        for _, module, index in indexed:
            module.layer_idx = index


# ---- zero-output, mean, resample: replacing what a layer writes ----------------------------


def sample_derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation of 0..n-1 with no fixed point (rejection sampling, as in
    tuned-lens: about e draws are needed on average)."""
    if n < 2:
        raise ValueError(f"a derangement of {n} positions: expected at least 2")
    identity = torch.arange(n)
    permutation = torch.randperm(n, generator=generator)
    while bool((permutation == identity).any()):
        permutation = torch.randperm(n, generator=generator)
    return permutation


def replace_update(method: str, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What the next layer gets instead of `y` under `method`, from the layer's input `x` and
    output `y` ([batch, positions, hidden]); the update is y - x."""
    if method == "zero-output":
        return torch.zeros_like(y)
    update = (y - x).flatten(0, 1)  # batch and positions together: tuned-lens' mode="token"
    if method == "mean":
        replaced = update.mean(0, keepdim=True).expand_as(update)
    elif method == "resample":
        replaced = update[sample_derangement(update.shape[0], generator)]
    else:
        raise ValueError(f"ablation method {method!r} by hook: expected zero-output, mean or resample")
    return x + replaced.reshape(x.shape)


def _hook(method: str, generator: torch.Generator) -> Callable[..., Any]:
    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        # Some transformers versions return (hidden_states, ...) from a decoder layer.
        if isinstance(output, tuple):
            return (replace_update(method, x, output[0], generator), *output[1:])
        return replace_update(method, x, output, generator)

    return hook


@contextmanager
def hooked_layers(model: Any, ablated: Iterable[int], method: str, seed: int = DEFAULT_SEED) -> Iterator[list[int]]:
    """`model` with the decoder layers `ablated` replaced by `method` (zero-output, mean or
    resample) while the block runs; yields them, sorted. The hooks go when the block ends."""
    layers = decoder_layers(model)
    chosen = sorted(set(ablated))
    if not set(chosen) <= set(range(len(layers))):
        raise ValueError(f"layers to ablate {chosen}: expected layers of 0-{len(layers) - 1}")
    if method not in METHODS or method == "skip":
        raise ValueError(f"ablation method {method!r} by hook: expected zero-output, mean or resample")
    # Seeded here, not per hook, so one measurement is reproducible whatever ran before it.
    generator = torch.Generator().manual_seed(seed)
    handles = []
    try:
        for i in chosen:
            handles.append(layers[i].register_forward_hook(_hook(method, generator), with_kwargs=True))
        yield chosen
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def ablated(model: Any, layers: Iterable[int], method: str, seed: int = DEFAULT_SEED) -> Iterator[list[int]]:
    """`model` with `layers` ablated by `method` (one of METHODS) while the block runs; yields
    the ablated layers, sorted. Everything is restored afterwards, also when the block raises."""
    chosen = sorted(set(layers))
    if method == "skip":
        with without_layers(model, chosen):
            yield chosen
    else:
        with hooked_layers(model, chosen, method, seed):
            yield chosen
