"""The task-vector family: one pipeline (mergekit's ``generalized_task_arithmetic.py``), eight methods.

    tau_t  = theta_t - theta_0                                   task vector of expert t, per tensor
    tau^_t = rescale_t(sparsify_t(tau_t))                        drop entries, then give back their mass
    s      = sign(sum_t w_t tau^_t)                              elected per entry (members with election)
    tau_m  = sum_t w_t tau^_t [agree_t]   / sum_t w_t [agree_t]  with election (the division: normalize)
           = sum_t w_t tau^_t             / sum_t w_t            without election (the division: normalize)
    theta  = theta_0 + lambda * tau_m                            (agree_t: tau^_t != 0 with the sign s)

    method            sparsify           elect  normalize: ours / mergekit   rescale: ours / mergekit
    task_arithmetic   -                  no     false / false                -
    ties              magnitude top-k    yes    true  / true                 none / none
    dare_ties         random (DARE)      yes    true  / false                keep_prob / l1
    dare_linear       random (DARE)      no     false / false                keep_prob / l1
    breadcrumbs       magnitude band     no     false / false                none / none
    breadcrumbs_ties  magnitude band     yes    true  / false                none / none
    della             MagPrune           yes    true  / true                 keep_prob / l1
    della_linear      MagPrune           no     false / false                keep_prob / l1

Our defaults follow each method's paper (breadcrumbs_ties has none: TIES's disjoint mean, as our other
electing members); ``mergekit_defaults`` holds the values that reproduce mergekit 0.1.5, including its
default ``density`` of 1.0. ``density``, ``gamma`` and ``epsilon`` may differ per expert.

Sparsifiers (per expert and per tensor; n = the tensor's number of entries):
- magnitude (ties): keep the k largest |tau|. ``rounding: nearest``: k = round(density * n), halves up;
  ``floor`` (mergekit): k = max(1, int(density * n)) for 0 < density < 1. Entries tied at the threshold
  are kept by lowest flat index (mergekit: whichever its argsort puts first), found exactly by a
  streaming radix select (:class:`~mergebench.core.analysis.MagnitudeThreshold`): two histogram passes,
  no sort, chunked and whole-tensor merges agree bit for bit. ``trim_scope: global`` trims over the whole
  task vector, as the original TIES code does (mergekit and peft trim per tensor).
- magnitude band (breadcrumbs): drop the n_top = count(gamma) largest |tau| as outliers and keep the next
  k = count(density); where n_top + k > n, n_top shrinks to n - k so the density is met (mergekit's rule).
  count is round half up (nearest) or int() (floor); ties as above. mergekit 0.1.5 keeps its ascending
  sort's [n_bot, n_bot + k) with n_bot = max(0, n - k - n_top), the same set. Older mergekit kept
  [n_bot:-n_top], which is empty when n_top is 0 (all of a small tensor dropped); 0.1.5 no longer does,
  so there is no quirk to reproduce. Per tensor, as the paper's text and mergekit; the authors' code
  ranks per row (last dimension), which we do not offer.
- random (DARE): keep each entry with probability density, from expert t's stream ``ctx.generator_for(t)``
  (one CPU stream per (seed, tensor, expert content), consumed in order, two 16-bit uniforms per 32-bit
  draw, so the probability is density rounded to a multiple of 1/65536). The same experts in any order,
  sharding, chunking, thread count or device give the same output; mergekit draws from torch's global
  generator, so outputs agree in distribution, not bit for bit. density >= 1 keeps all without drawing.
- MagPrune (della): along dim 1 (a 1-D tensor is one row) rank |tau| ascending (ties by index),
  r = rank / (row length - 1), keep probability p = density - epsilon + 2 epsilon r (a one-entry row:
  p = density), then Bernoulli(p) from the expert's stream in flat order. Needs density - epsilon > 0
  and density + epsilon < 1; density >= 1 drops nothing and density <= 0 drops all, as in mergekit.
  Ranks need whole rows, so della and della_linear see whole tensors (not elementwise); a 2-D tensor's
  ranks, draws and keep_prob division then go by blocks of rows (:func:`magprune_`), and the mix by blocks of
  entries: the same bits, without whole temporaries beside the inputs.

``rescale``, per expert and tensor, after sparsifying (mergekit's ``rescale: true | false`` is ``l1 | none``):
- keep_prob: divide each kept entry by its keep probability: 1/density (DARE paper, peft), 1/p_i (DELLA
  paper and its authors' code). With one density for all experts DARE's 1/density is a common positive
  factor, applied once after mixing (it changes neither the elected signs nor which entries agree).
- l1: scale the sparsified vector so its L1 norm equals the original's (mergekit; skipped when either norm
  is below 1e-7). Both norms are exact sums (:func:`~mergebench.core.merge_ops.exact_l1`); a chunked
  member computes them in a pre-pass (:class:`~mergebench.core.analysis.L1RescalePass`), which for DARE
  draws the masks from the experts' streams and keeps them for the merge (drawn once, as without the pre-pass).
- none.

``zero_sum_sign``, for electing members: the sign elected where the weighted sum is exactly 0: ``zero``
(TIES: no sign, so no expert agrees and the entry merges to 0) or ``positive`` (mergekit: +1, the positive
entries are merged). Sign election needs positive expert weights (refused otherwise; mergekit accepts any
weight and elects on w * tau). ``normalize`` without election divides by sum_t w_t and refuses weights that
sum to 0 (mergekit then silently leaves the sum undivided).

Every member returns the lambda-free merged task vector (``delta``), so a sweep computes it once and
applies every lambda on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Mapping

import numpy as np
import torch

from mergebench.core.analysis import (RECORD_MASKS, Combined, L1Rescale, L1RescalePass, MagnitudeThreshold,
                                      run_analysis)
from mergebench.core.context import TensorContext
from mergebench.core.errors import MergebenchError, ParameterError
from mergebench.core.hookspecs import hookimpl
from mergebench.core.merge_ops import (BLOCK, agreeing_sums, disjoint_mean, elect_sign, exact_l1, floor_count,
                                       keep_count, l1_rescale_factor, mul_mask_, one_thread, ordered_map, random_drop_,
                                       random_keep_mask, spans, task_vectors_, threshold_mask, weighted_sum)
from mergebench.core.registry import MergeMethod, Param
from mergebench.core.tensor_params import is_varying
from mergebench.plugins import LAMBDA_GRID

DENSITY_GRID = (0.1, 0.2)  # the TIES and DARE papers prune 90% and 80% of each task vector

MAGNITUDE, BAND, RANDOM, MAGPRUNE = "magnitude", "band", "random", "magprune"

DENSITY = Param("density", float, 0.2, "fraction of each task vector's entries kept", min=0.0, max=1.0,
                per_expert=True)
LAMBDA = Param("lambda", float, 1.0, "scale applied to the merged task vector", min=0.0, max=10.0)
GAMMA = Param("gamma", float, 0.01, "fraction of largest-magnitude entries dropped as outliers", min=0.0, max=1.0,
              per_expert=True)
EPSILON = Param("epsilon", float, 0.15, "keep probabilities span density - epsilon .. density + epsilon by rank",
                min=0.0, max=1.0, per_expert=True)
TRIM_SCOPE = Param("trim_scope", str, "tensor", "trim each tensor alone, or the whole task vector",
                   choices=("tensor", "global"))
ROUNDING = Param("rounding", str, "nearest", "entries kept: density * numel rounded half up, or int() as mergekit",
                 choices=("nearest", "floor"))
ZERO_SUM_SIGN = Param("zero_sum_sign", str, "zero",
                      "sign elected where the weighted sum is 0: none (the entry merges to 0), or + as mergekit",
                      choices=("zero", "positive"))
RESCALES = {MAGNITUDE: ("none", "l1"), BAND: ("none", "l1"), RANDOM: ("keep_prob", "l1", "none"),
            MAGPRUNE: ("keep_prob", "l1", "none")}


def positive_weights(params, weights):
    if any(w <= 0 for w in weights):
        raise ParameterError(f"sign election needs positive expert weights, got {list(weights)}")


def _n_experts(experts) -> int:
    return len(experts.weights if isinstance(experts, TensorContext) else experts)


def _values(name: str, params: Mapping[str, Any], experts) -> tuple:
    """Per expert, its value of per-expert parameter ``name``. ``experts``: the tensor's context, or one
    mapping of own values per expert (the whole-model pre-pass)."""
    if isinstance(experts, TensorContext):
        return experts.expert_values(name, params)
    return tuple(own.get(name, params[name]) for own in experts)


def _row_ranks(keys: torch.Tensor) -> torch.Tensor:
    """Each entry's rank within its row of non-negative int32 ``keys``, ties by index: the inverse of a
    stable argsort along dim 1."""
    length = keys.shape[1]
    if keys.device.type == "cpu":
        # numpy's SIMD sort of unique int64 keys (the value, then the column) gives the stable order ~3x
        # faster than torch's stable argsort on the CPU
        unique = (keys.to(torch.int64) << 32) | torch.arange(length, dtype=torch.int64)
        order = torch.from_numpy(np.sort(unique.numpy(), axis=1)).bitwise_and_(0xFFFFFFFF)
    else:
        order = torch.argsort(keys, dim=1, stable=True)
    # each entry's rank is the inverse permutation of the sort: a scatter, not a second sort
    positions = torch.arange(length, device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


# entries per block of MagPrune's ranks and draws: their int64 sort keys and ranks are ~6 float32 copies of a block,
# and the experts go side by side on the engine's threads
PRUNE_BLOCK = 1 << 18


def _each_expert(fn: Callable[[int], Any], taus: list[torch.Tensor]) -> list[Any]:
    """fn(t) for every expert t, the experts side by side on the threads the caller was given, one each: the same
    results as one after another (the engine gives a tensor of the largest size every core)."""
    with one_thread(taus[0].device) as threads:
        return list(ordered_map(fn, list(range(len(taus))), threads))


def magprune_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability of each entry: density - epsilon + 2 epsilon * rank / (row length - 1), ranking
    |tau| ascending along dim 1 (a 0-D or 1-D tensor is one row; ties by index); a one-entry row gets density."""
    # rank along dim 1 as mergekit does: dim 1 moved last, the other dimensions flattened into rows
    lined = tau.reshape(1, -1) if tau.dim() < 2 else tau.movedim(1, -1)
    rows = lined.flatten(0, -2)  # (0,) -> (1, 0) too
    length = rows.shape[1]
    # |x| as float32 bits sorts like |x| (non-negative floats order as their integer patterns)
    ranks = _row_ranks(rows.abs().to(torch.float32).view(torch.int32)).to(torch.float32)
    r = ranks / (length - 1) if length > 1 else torch.full_like(ranks, 0.5)
    probabilities = ((density - epsilon) + r * (2 * epsilon)).reshape(lined.shape)
    return probabilities.movedim(-1, 1).contiguous() if tau.dim() > 2 else probabilities.reshape(tau.shape)


def magprune_(tau: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
              divide: bool) -> torch.Tensor:
    """DELLA's drop, in place: keep each entry with its :func:`magprune_probabilities` p (Bernoulli, from
    ``generator`` in flat order), and divide the kept ones by p where ``divide`` (rescale ``keep_prob``).

    A 2-D tensor's rows are contiguous in flat order and ranked independently, so it goes by blocks of
    whole rows of an even number of entries (the draws then equal one draw for the whole tensor): the same
    bits as the whole tensor at once, with temporaries of one block. Other shapes (a 1-D tensor is one row;
    3-D ones rank along dim 1, across flat order) go whole."""
    if tau.dim() != 2 or tau.numel() <= PRUNE_BLOCK:
        blocks = [tau]
    else:
        rows, length = tau.shape
        step = max(1, PRUNE_BLOCK // length)  # the sort's int64 temporaries are a few blocks' worth, per thread
        step += (step * length) % 2  # an odd number of entries would split a 32-bit draw between two blocks
        blocks = [tau[start:start + step] for start in range(0, rows, step)]
    for block in blocks:
        p = magprune_probabilities(block, density, epsilon)
        mul_mask_(block, random_keep_mask(block.numel(), p.reshape(-1), generator).view(block.shape).to(block.device))
        if divide:
            block.div_(p.to(block.device))
    return tau


@dataclass(frozen=True)
class TaskVectorMethod:
    """One member of the family: its sparsifier, whether it elects signs, its defaults (from its paper) and
    the values that reproduce mergekit 0.1.5. :meth:`method` makes its :class:`MergeMethod`."""

    name: str
    description: str
    reference: str
    sparsifier: str | None  # None, MAGNITUDE, BAND, RANDOM or MAGPRUNE
    sign_election: bool
    normalize: bool  # the default of ``normalize``
    rescale: str = "none"  # the default of ``rescale`` (members that sparsify)
    mergekit: dict = field(default_factory=dict)
    search_space: dict = field(default_factory=dict)
    scale: Param = LAMBDA

    @cached_property
    def params(self) -> tuple[Param, ...]:
        s = self.sparsifier
        return tuple(p for p in (
            DENSITY if s else None,
            GAMMA if s == BAND else None,
            EPSILON if s == MAGPRUNE else None,
            self.scale,
            TRIM_SCOPE if s == MAGNITUDE else None,
            Param("normalize", bool, self.normalize,
                  "divide by the summed weights of the agreeing experts" if self.sign_election
                  else "divide by the sum of the expert weights"),
            Param("rescale", str, self.rescale, "kept entries times 1/keep probability (keep_prob), the original "
                  "L1 norm given back (l1), or unchanged (none)", choices=RESCALES[s]) if s else None,
            ROUNDING if s in (MAGNITUDE, BAND) else None,
            ZERO_SUM_SIGN if self.sign_election else None,
        ) if p is not None)

    @property
    def elementwise(self) -> bool:
        return self.sparsifier != MAGPRUNE

    @cached_property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def _full(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults overlaid with ``params`` (a direct call may pass only some of them)."""
        return {**self.defaults, **params}

    # ---- the maths -------------------------------------------------------------------------------------

    def delta(self, base, experts, params, ctx):
        """The member's merged task vector, before lambda."""
        params = self._full(params)
        if self._needs_prepass(params) and (ctx.analysis is None or ctx.state.get("own_prepass")):
            # a direct call, on a whole tensor: the pre-pass runs here, which a chunk cannot do for its tensor
            if ctx.offset:
                raise MergebenchError(f"merge method '{self.name}' got a chunk of tensor '{ctx.name}' without its "
                                      f"pre-pass (the engine must give the pre-pass the tensor's context)")
            ctx.analysis = run_analysis(self._tensor_prepass(params, ctx), ctx.name, base, experts)
            ctx.state["own_prepass"] = True
            # a new whole tensor: the tie allowances a previous call used up start again from this pre-pass
            ctx.state.pop("ties_left", None)
            ctx.state.pop("band_left", None)
        taus = task_vectors_(base, experts)
        rescale = params.get("rescale", "none")
        before = _each_expert(lambda t: exact_l1(taus[t]), taus) if rescale == "l1" and not self.elementwise else None
        self._sparsify_(taus, params, ctx)
        common = None
        if rescale == "l1":
            factors = (ctx.analysis.factors if before is None else [
                l1_rescale_factor(b, a) for b, a in zip(before, _each_expert(lambda t: exact_l1(taus[t]), taus))])
            for tau, factor in zip(taus, factors):
                if factor != 1.0:
                    tau.mul_(factor)
        elif rescale == "keep_prob" and self.sparsifier == RANDOM:
            densities = ctx.expert_values("density", params)
            if len(set(densities)) == 1:
                common = densities[0]
            else:
                for tau, d in zip(taus, densities):
                    if d < 1.0:
                        tau.div_(d)
        if self.elementwise or not all(tau.is_contiguous() for tau in taus):
            out = self._mix(taus, params, ctx.weights)  # a chunk (the engine's), or a direct call's odd layout
        else:  # a whole tensor (della): the mix is elementwise, so by blocks, each written over the first
            flat = [tau.view(-1) for tau in taus]  # task vector once read (the same bits as one whole mix)
            for start, stop in spans(flat[0].numel(), BLOCK):
                flat[0][start:stop] = self._mix([f[start:stop] for f in flat], params, ctx.weights)
            out = taus[0]
        return out if common is None else out.div_(common)

    def _mix(self, taus, params, weights):
        if self.sign_election:
            sign = elect_sign(taus, weights, params["zero_sum_sign"])
            if params["normalize"]:
                return disjoint_mean(taus, weights, sign)
            return agreeing_sums(taus, weights, sign)[0]
        out = weighted_sum(taus, weights)
        return out.div_(sum(weights)) if params["normalize"] else out

    def _sparsify_(self, taus, params, ctx):
        """Zero each task vector's dropped entries in place; no rescaling, except MagPrune's ``keep_prob``
        division, done block by block beside the draws (its probabilities are never all held at once). In the L1
        pre-pass (``RECORD_MASKS`` in ``ctx.state``) the random sparsifier only records its draws."""
        trim = ctx.analysis.inner if isinstance(ctx.analysis, L1Rescale) else ctx.analysis
        if self.sparsifier == MAGNITUDE:
            # per expert, the tied entries still to keep: carried across the chunks of the tensor
            left = ctx.state.setdefault("ties_left", [ties for _, ties in trim])
            for t, (tau, (threshold, _)) in enumerate(zip(taus, trim)):
                mask, used = threshold_mask(tau, threshold, left[t])
                left[t] -= used
                mul_mask_(tau, mask)
        elif self.sparsifier == BAND:
            upper, lower = trim
            left = ctx.state.setdefault("band_left", [[ties for _, ties in upper], [ties for _, ties in lower]])
            for t, tau in enumerate(taus):
                outlier, used_upper = threshold_mask(tau, upper[t][0], left[0][t])
                kept, used_lower = threshold_mask(tau, lower[t][0], left[1][t])
                left[0][t] -= used_upper
                left[1][t] -= used_lower
                mul_mask_(tau, kept & ~outlier)
        elif self.sparsifier == RANDOM:
            drawn = ctx.analysis.masks if isinstance(ctx.analysis, L1Rescale) else None  # the L1 pre-pass's draws
            record = ctx.state.get(RECORD_MASKS)  # set in that pre-pass: keep the draws for the merge
            for t, (tau, d) in enumerate(zip(taus, ctx.expert_values("density", params))):
                self._check_density(params, d, t)
                if drawn is not None and drawn[t] is not None:
                    mul_mask_(tau, drawn[t].span(ctx.offset, tau.numel()).view(tau.shape).to(tau.device))
                elif record is not None and d < 1.0:  # the L1 pre-pass: its sums read the mask, not tau
                    record[t].append(random_keep_mask(tau.numel(), d, ctx.generator_for(t)))
                else:
                    random_drop_(tau, d, ctx.generator_for(t))
        elif self.sparsifier == MAGPRUNE:
            values = list(zip(ctx.expert_values("density", params), ctx.expert_values("epsilon", params)))
            for t, (d, eps) in enumerate(values):
                if 0.0 < d < 1.0:
                    self._check_window(d, eps, t)
            divide = params.get("rescale") == "keep_prob"

            def prune(t: int) -> None:
                (d, eps), tau = values[t], taus[t]
                if d >= 1.0 or d <= 0.0:  # mergekit: nothing dropped / all dropped, whatever epsilon
                    if d <= 0.0:
                        tau.zero_()
                    return
                magprune_(tau, d, eps, ctx.generator_for(t), divide=divide)

            _each_expert(prune, taus)  # each expert's own draws and sorts (numpy's, on one core)

    # ---- checks ----------------------------------------------------------------------------------------

    def _check(self, params, weights):
        """Refuse, before any tensor is read, what the method-level values make impossible."""
        params = self._full(params)
        if self.sparsifier == RANDOM:
            self._check_density(params, params["density"])
        if self.sparsifier == MAGPRUNE and 0.0 < params["density"] < 1.0:
            self._check_window(params["density"], params["epsilon"])
        if params.get("rescale") == "l1" and params.get("trim_scope") == "global":
            raise ParameterError(f"merge method '{self.name}': rescale 'l1' matches each tensor's L1 norm, so it "
                                 f"needs trim_scope: tensor")
        if self.sign_election:
            positive_weights(params, weights)
        elif params["normalize"] and abs(sum(weights)) < 1e-8:
            raise ParameterError(f"merge method '{self.name}': normalize: true divides by the sum of the expert "
                                 f"weights, which is 0; change the weights or set normalize: false")

    def _check_density(self, params, density, expert=None):
        if params["rescale"] == "keep_prob" and density <= 0:
            who = "" if expert is None else f" for expert {expert + 1}"
            raise ParameterError(f"parameter 'density' of merge method '{self.name}' must be > 0 (it rescales by "
                                 f"1/density){who}")

    def _check_window(self, density, epsilon, expert=None):
        if not (density - epsilon > 0 and density + epsilon < 1):
            who = "" if expert is None else f" (expert {expert + 1})"
            raise ParameterError(f"merge method '{self.name}' keeps entries with probabilities density +- epsilon, "
                                 f"which must lie in (0, 1); got density {density}, epsilon {epsilon}{who}")

    # ---- pre-passes ------------------------------------------------------------------------------------

    def _needs_prepass(self, params) -> bool:
        return self.sparsifier in (MAGNITUDE, BAND) or (self.sparsifier == RANDOM and params["rescale"] == "l1")

    def tensor_analysis(self, params, experts):
        """The per-tensor pre-pass: thresholds of the magnitude sparsifiers, L1 norms for ``rescale: l1``.
        ``experts``: the tensor's :class:`TensorContext`."""
        params = self._full(params)
        if not self._needs_prepass(params) or params.get("trim_scope", "tensor") != "tensor":
            return None
        return self._tensor_prepass(params, experts)

    def analysis(self, params, experts):
        """The whole-model pre-pass of ``trim_scope: global``. ``experts``: one mapping of own values per expert."""
        params = self._full(params)
        return self._trim(params, experts) if params.get("trim_scope") == "global" else None

    def _tensor_prepass(self, params, experts):
        trim = self._trim(params, experts) if self.sparsifier in (MAGNITUDE, BAND) else None
        if params["rescale"] != "l1":
            return trim
        return L1RescalePass(trim, _n_experts(experts), lambda taus, ctx: self._sparsify_(taus, params, ctx), experts,
                             draws=self.sparsifier == RANDOM)

    def _trim_values(self, params, experts) -> dict[str, tuple]:
        names = ("density", "gamma") if self.sparsifier == BAND else ("density",)
        return {name: _values(name, params, experts) for name in names}

    def _trim(self, params, experts):
        """The magnitude thresholds: one top-k per expert (magnitude), or the outliers' and the kept band's
        lower edge (band)."""
        n = _n_experts(experts)
        values = self._trim_values(params, experts)
        densities = values["density"]
        if self.sparsifier == MAGNITUDE:
            density = densities[0] if len(set(densities)) == 1 else densities
            if params["rounding"] == "nearest":
                return MagnitudeThreshold(density, n)
            return MagnitudeThreshold(density, n,
                                      counts=lambda total: [mergekit_magnitude_count(d, total) for d in densities])
        count = keep_count if params["rounding"] == "nearest" else floor_count

        def kept(total):
            return [count(d, total) for d in densities]

        def outliers(total):
            return [min(count(g, total), total - k) for g, k in zip(values["gamma"], kept(total))]

        return Combined(MagnitudeThreshold(densities, n, counts=outliers),
                        MagnitudeThreshold(densities, n,
                                           counts=lambda total: [a + b for a, b in zip(outliers(total), kept(total))]))

    def _draws(self, params, expert_params) -> bool:
        """Random sparsifiers draw only where some expert's density lies strictly between 0 and 1 (a density
        that varies by tensor, a gradient or filters, is taken to draw)."""
        densities = [ep.get("density", params["density"]) for ep in expert_params] or [params["density"]]
        return any(is_varying(d) or 0.0 < d < 1.0 for d in densities)

    # ---- registration ----------------------------------------------------------------------------------

    def method(self) -> MergeMethod:
        prepass = self.sparsifier in (MAGNITUDE, BAND, RANDOM)
        return MergeMethod(
            name=self.name, description=self.description, reference=self.reference, params=self.params,
            delta=self.delta, scale_param="lambda", check=self._check, elementwise=self.elementwise,
            stochastic=self.sparsifier in (RANDOM, MAGPRUNE), random_when=self._draws,
            tensor_analysis=self.tensor_analysis if prepass else None,
            analysis=self.analysis if self.sparsifier == MAGNITUDE else None,
            mergekit_defaults=self.mergekit, search_space=self.search_space)


def mergekit_magnitude_count(density: float, numel: int) -> int:
    """mergekit's magnitude sparsifier: all at density >= 1, none at <= 0, else max(1, int(density * numel))."""
    if density >= 1.0:
        return numel
    if density <= 0.0 or numel == 0:
        return 0
    return max(1, floor_count(density, numel))


DARE = "Yu et al., Language Models are Super Mario (DARE), arXiv:2311.03099"
BREADCRUMBS = ("Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, "
               "arXiv:2312.06795")
DELLA = ("Deep, Bhardwaj & Poria, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
         "Sampling, arXiv:2406.11617")
SPARSE_GRID = {"lambda": LAMBDA_GRID, "density": DENSITY_GRID}
MERGEKIT_ELECT = {"zero_sum_sign": "positive"}

TASK_ARITHMETIC = TaskVectorMethod(
    "task_arithmetic", "Base plus lambda times the weighted sum of task vectors.",
    "Ilharco et al., Editing Models with Task Arithmetic, arXiv:2212.04089",
    sparsifier=None, sign_election=False, normalize=False,
    mergekit={"normalize": False}, search_space={"lambda": LAMBDA_GRID},
    scale=Param("lambda", float, 1.0, "scale applied to the summed task vectors", min=-10.0, max=10.0))
TIES = TaskVectorMethod(
    "ties", "Trim task vectors by magnitude, elect signs, average the agreeing entries.",
    "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, arXiv:2306.01708",
    sparsifier=MAGNITUDE, sign_election=True, normalize=True,
    mergekit={"density": 1.0, "normalize": True, "rescale": "none", "rounding": "floor", **MERGEKIT_ELECT},
    search_space=SPARSE_GRID)
DARE_TIES = TaskVectorMethod(
    "dare_ties", "Randomly drop and rescale task-vector entries, then TIES sign election and mean.", DARE,
    sparsifier=RANDOM, sign_election=True, normalize=True, rescale="keep_prob",
    mergekit={"density": 1.0, "normalize": False, "rescale": "l1", **MERGEKIT_ELECT}, search_space=SPARSE_GRID)
DARE_LINEAR = TaskVectorMethod(
    "dare_linear", "Randomly drop and rescale task-vector entries, then add them (task arithmetic).", DARE,
    sparsifier=RANDOM, sign_election=False, normalize=False, rescale="keep_prob",
    mergekit={"density": 1.0, "normalize": False, "rescale": "l1"}, search_space=SPARSE_GRID)
BREADCRUMBS_LINEAR = TaskVectorMethod(
    "breadcrumbs", "Drop each task vector's largest outliers and its small entries, then add them.", BREADCRUMBS,
    sparsifier=BAND, sign_election=False, normalize=False,
    mergekit={"density": 1.0, "gamma": 0.01, "normalize": False, "rescale": "none", "rounding": "floor"},
    search_space=SPARSE_GRID)
BREADCRUMBS_TIES = TaskVectorMethod(
    "breadcrumbs_ties", "Drop each task vector's outliers and small entries, then TIES sign election and mean.",
    BREADCRUMBS, sparsifier=BAND, sign_election=True, normalize=True,
    mergekit={"density": 1.0, "gamma": 0.01, "normalize": False, "rescale": "none", "rounding": "floor",
              **MERGEKIT_ELECT},
    search_space=SPARSE_GRID)
DELLA_TIES = TaskVectorMethod(
    "della", "Drop entries with probabilities rising with their magnitude rank, rescale, elect signs, average.",
    DELLA, sparsifier=MAGPRUNE, sign_election=True, normalize=True, rescale="keep_prob",
    mergekit={"density": 1.0, "epsilon": 0.15, "normalize": True, "rescale": "l1", **MERGEKIT_ELECT},
    search_space={"lambda": LAMBDA_GRID, "density": (0.3, 0.5)})
DELLA_LINEAR = TaskVectorMethod(
    "della_linear", "Drop entries with probabilities rising with their magnitude rank, rescale, add them.",
    DELLA, sparsifier=MAGPRUNE, sign_election=False, normalize=False, rescale="keep_prob",
    mergekit={"density": 1.0, "epsilon": 0.15, "normalize": False, "rescale": "l1"},
    search_space={"lambda": LAMBDA_GRID, "density": (0.3, 0.5)})

MEMBERS = (TASK_ARITHMETIC, TIES, DARE_TIES, DARE_LINEAR, BREADCRUMBS_LINEAR, BREADCRUMBS_TIES, DELLA_TIES,
           DELLA_LINEAR)

# TIES's pieces under the names the former mergebench/plugins/ties.py gave them (tests reach them so)
ties_delta, tensor_threshold, global_threshold = TIES.delta, TIES.tensor_analysis, TIES.analysis


@hookimpl
def register_merge_methods(register):
    for member in MEMBERS:
        register(member.method())
