"""`mlp`: a small MLP g(x) (hidden width, number of layers, activation); not mergeable.

Conv2d sites get a convolution with the site's kernel followed by 1x1 convolutions (a
per-pixel MLP); embedding sites get a lookup into the hidden width followed by the MLP.
The last layer starts at zero so the adapted model starts unchanged.
"""
from __future__ import annotations

from torch import nn

from colaft.adapters.base import SiteSpec, register_adapter

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def _first_layer(spec: SiteSpec, hidden: int) -> nn.Module:
    if spec.kind == "linear":
        return nn.Linear(spec.in_features, hidden)
    if spec.kind == "conv2d":
        # same kernel geometry as the site so the output has its spatial size; no grouping needed
        return nn.Conv2d(spec.in_features, hidden, spec.kernel_size, spec.stride, spec.padding, spec.dilation,
                         padding_mode=spec.padding_mode)
    return nn.Embedding(spec.in_features, hidden, spec.padding_idx)


def _layer(spec: SiteSpec, n_in: int, n_out: int) -> nn.Module:
    return nn.Conv2d(n_in, n_out, 1) if spec.kind == "conv2d" else nn.Linear(n_in, n_out)


@register_adapter("mlp")
def build(spec: SiteSpec, config) -> nn.Module:
    act = ACTIVATIONS[config.activation]
    layers: list[nn.Module] = [_first_layer(spec, config.hidden), act()]
    for _ in range(config.layers - 2):
        layers += [_layer(spec, config.hidden, config.hidden), act()]
    last = _layer(spec, config.hidden, spec.out_features)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)
