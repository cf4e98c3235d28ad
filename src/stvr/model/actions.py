"""The action distance term of the match logit (``model.match_action_distance``; not in the paper).

The cosine of the backbone crop means (``model.match_cosine``) compares everything a crop
holds at once; one salient action the query and an actor share dominates it, so actors whose
labels differ by one action rank close to the matches (issue 11: ``bench_match_relations.py``,
match AUC 0.55-0.85 against such "nested" or "overlapping" negatives, 0.84-0.95 against
disjoint ones). :class:`ActionProbe` reads the actions out first: a multi-label classifier
(linear, or with one hidden ReLU layer: ``model.action_probe_hidden``) on the standardized
backbone crop mean, fitted once on the *training* actors' annotations
(:func:`stvr.pretrain.fit_action_probe`, before training; the backbone must stay frozen so that the features it was fitted on do not change), and kept fixed. The term added to
the query-match logit is ``-s * sum_a |p_a(proposal) - p_a(query)|`` with ``p = sigmoid(W h + b)``,
``h = z`` (linear) or ``h = relu(W_h z + b_h)``,
over the probe's ``A`` actions (``model.action_ids``) and ``s = exp(log_scale)`` learned from
:data:`INITIAL_SCALE`: actors that differ from the query in one action are one unit of distance
away whatever else they share. The labels of validation and test (combinations of actions
never shown in training) are only ever seen through their actions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ActionProbe", "INITIAL_SCALE"]

#: the distance's starting weight in the match logit (learned during training)
INITIAL_SCALE = 5.0


class ActionProbe(nn.Module):
    """Multi-label action classifier on crop means ``[K, C]`` (fixed once fitted) and the learned
    weight of its distance in the match logit.

    Buffers: ``mean``/``std`` ``[C]`` (feature standardization), ``weight [A, H]``, ``bias [A]``
    with ``H = C`` (linear, ``hidden=0``) or ``H = hidden`` and then also ``hidden_weight [H, C]``,
    ``hidden_bias [H]`` (one ReLU layer); ``fitted`` (0-d, 1.0 once fitted; a float like every
    stored tensor). Parameter: ``log_scale`` (0-d).
    """

    def __init__(self, channels: int, num_actions: int, hidden: int = 0) -> None:
        super().__init__()
        if num_actions < 1:
            raise ValueError("the action probe needs at least one action id (model.action_ids)")
        if hidden < 0:
            raise ValueError(f"the action probe's hidden width must be >= 0, got {hidden}")
        self.hidden = int(hidden)
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        if self.hidden:
            self.register_buffer("hidden_weight", torch.zeros(self.hidden, channels))
            self.register_buffer("hidden_bias", torch.zeros(self.hidden))
        self.register_buffer("weight", torch.zeros(num_actions, self.hidden or channels))
        self.register_buffer("bias", torch.zeros(num_actions))
        self.register_buffer("fitted", torch.tensor(0.0))
        self.log_scale = nn.Parameter(torch.tensor(math.log(INITIAL_SCALE)))

    @property
    def num_actions(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, features: Tensor) -> Tensor:
        """Crop means ``[K, C]`` -> action logits ``[K, A]``."""
        layers = [self.hidden_weight, self.hidden_bias] if self.hidden else []
        return _classify((features - self.mean) / self.std, layers, self.weight, self.bias)

    def probabilities(self, features: Tensor) -> Tensor:
        """Crop means ``[K, C]`` -> action probabilities ``[K, A]`` in [0, 1]."""
        return torch.sigmoid(self.logits(features))

    def distance(self, proposal: Tensor, query: Tensor) -> Tensor:
        """L1 distance ``[K]`` (in [0, A]) between the action probabilities of ``proposal [K, C]``
        and ``query [K, C]`` crop means."""
        return (self.probabilities(proposal) - self.probabilities(query)).abs().sum(1)

    def add_to_match_logit(self, logits: Tensor, distance: Tensor) -> Tensor:
        """``logits [K, n]`` with ``-s * distance [K]`` added to the last (query-match) logit."""
        match = logits[:, -1:] - (self.log_scale.exp() * distance)[:, None]
        return torch.cat([logits[:, :-1], match], dim=1)

    @torch.no_grad()
    def fit(self, features: Tensor, targets: Tensor, l2: float = 1e-3, max_iter: int = 300,
            seed: int = 0) -> float:
        """Fit the classifier to ``features [M, C]`` with multi-hot ``targets [M, A]``.

        Standardizes the features (their mean and standard deviation become the buffers), then
        minimizes the mean binary cross-entropy plus ``l2`` times the squared norms of the weight
        matrices with L-BFGS (deterministic) in float64. The linear classifier starts at zero; with
        a hidden layer both matrices start Gaussian with variance ``1 / fan_in`` (a generator of
        ``seed``: the same features and seed give the same probe). Marks the probe fitted and
        returns the final loss.
        """
        x = features.detach().double()
        y = targets.detach().double()
        if x.ndim != 2 or y.shape != (x.shape[0], self.num_actions) or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features [M, {self.mean.shape[0]}] and targets [M, {self.num_actions}] expected, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[0] < 2:
            raise ValueError("the action probe needs at least 2 training actors")
        mean, std = x.mean(0), x.std(0) + 1e-6
        z = (x - mean) / std
        gen = torch.Generator().manual_seed(int(seed))

        def gaussian(rows: int, cols: int) -> Tensor:      # variance 1 / fan_in, from ``seed``
            w = torch.randn(rows, cols, generator=gen, dtype=torch.float64) / cols ** 0.5
            return w.to(x.device).requires_grad_()

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=x.device, requires_grad=True)

        if self.hidden:
            layers = [gaussian(self.hidden, x.shape[1]), zeros(self.hidden)]
            w = gaussian(self.num_actions, self.hidden)
        else:
            layers, w = [], zeros(self.num_actions, x.shape[1])
        b = zeros(self.num_actions)
        opt = torch.optim.LBFGS([*layers, w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            penalty = w.pow(2).sum() + sum(m.pow(2).sum() for m in layers[:1])
            loss = F.binary_cross_entropy_with_logits(_classify(z, layers, w, b), y) + l2 * penalty
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
            loss = float(closure().detach())
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(std.to(self.std.dtype))
        if self.hidden:
            self.hidden_weight.copy_(layers[0].detach().to(self.hidden_weight.dtype))
            self.hidden_bias.copy_(layers[1].detach().to(self.hidden_bias.dtype))
        self.weight.copy_(w.detach().to(self.weight.dtype))
        self.bias.copy_(b.detach().to(self.bias.dtype))
        self.fitted.fill_(1.0)
        return loss


def _classify(z: Tensor, layers: list[Tensor], weight: Tensor, bias: Tensor) -> Tensor:
    """Standardized features ``z [K, C]`` -> logits ``[K, A]``: ``layers`` is ``[]`` (linear) or
    ``[W_h [H, C], b_h [H]]`` (one ReLU layer first)."""
    if layers:
        z = F.relu(F.linear(z, layers[0], layers[1]))
    return F.linear(z, weight, bias)
