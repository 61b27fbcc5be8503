"""Stage I: learn, once, a preference over candidate bit widths for every module.

A plain loop (forward, loss, backward, step, log, checkpoint). Each step streams through the
blocks: only one block's candidates and activations are resident on the compute device; the
block's teacher-forced reconstruction loss is backpropagated to its logits; the gradients of all
logits accumulate, and one Adam step follows, with the augmented Lagrangian holding the expected
average bits to the training budget. Weights are never updated: only the logits.
"""

from __future__ import annotations

import os
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gamma.blocks import BlockRunner
from gamma.config import Stage1Config
from gamma.lagrangian import AugmentedLagrangian, price_shift
from gamma.mixed_linear import ColumnLayout, MixedLinear, PreferenceLogits, block_rows, swapped
from gamma.model import block_index
from gamma.progress import track
from gamma.quantizer import QuantizedWeight
from gamma.teacher import TeacherData


@dataclass
class Stage1Result:
    scores: np.ndarray  # [M, K] log-probabilities at the final temperature
    probabilities: np.ndarray
    expected_bits: float
    multiplier: float
    penalty: float
    violation: float
    history: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    resumed_from: int = 0


def temperature_at(cfg: Stage1Config, step: int) -> float:
    """Geometric schedule from ``temperature`` to ``temperature_end`` over the run."""
    if cfg.steps <= 1:
        return cfg.temperature_end
    frac = step / (cfg.steps - 1)
    return cfg.temperature * (cfg.temperature_end / cfg.temperature) ** frac


def block_error(kind: str, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, g2: torch.Tensor | None,
                full_length: int) -> torch.Tensor:
    """The teacher-forced reconstruction error of one block (see method.md, Stage I step 5).
    ``g2``: the squared gradient of the final loss at the block's output, per token ([n, t, h]) or
    per channel ([h], averaged over all calibration tokens); only the ``fisher`` loss uses it."""
    diff = (out - y).float()
    if kind == "output":
        return diff.pow(2).sum() / y.float().pow(2).sum()
    if kind == "update":
        return diff.pow(2).sum() / (y - x).float().pow(2).sum()
    # fisher: second-order estimate of the rise of the mean next-token loss, per sequence
    return 0.5 * (full_length - 1) * (g2 * diff.pow(2)).sum() / out.shape[0]


def channel_fisher(grads: list[torch.Tensor], total_sequences: int, all_reduce=None) -> list[torch.Tensor]:
    """Per block, ``G^2`` averaged over every calibration token (all sequences, all positions): a
    weight per channel that no minibatch's noise moves. With data parallelism each process holds
    some sequences; ``all_reduce`` sums their parts."""
    out = []
    for g in grads:
        s = g.float().pow(2).sum(dim=(0, 1))
        if all_reduce is not None:
            s = all_reduce(s)
        out.append(s / (total_sequences * g.shape[1]))
    return out


def _peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Candidates:
    """Dense candidate weights of one block at a time (cached while the total stays small)."""

    def __init__(self, candidates: dict[str, list[QuantizedWeight]], layouts: dict[str, ColumnLayout] | None,
                 cache_limit_bytes: float = 4e9):
        self.candidates = candidates
        self.layouts = layouts or {}
        total = sum(q.codes.numel() * 4 for qs in candidates.values() for q in qs)
        self.cache: dict[str, torch.Tensor] | None = {} if total <= cache_limit_bytes else None

    def dense(self, name: str, device: torch.device) -> torch.Tensor:
        if self.cache is not None and name in self.cache:
            return self.cache[name]
        t = torch.stack([q.dequantize() for q in self.candidates[name]])
        if name in self.layouts:
            t = self.layouts[name].to_model_order(t)
        t = t.to(device)
        if self.cache is not None:
            self.cache[name] = t
        return t


def learn_preferences(
    model: nn.Module,
    teacher: TeacherData,
    candidates: dict[str, list[QuantizedWeight]],
    bits: list[int],
    cfg: Stage1Config,
    init_logits: np.ndarray | None = None,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    stop_after: int | None = None,
    rank: int = 0,
    shard: tuple[torch.Tensor, int] | None = None,
    all_reduce=None,
    checkpoint_key: str = "",
    layouts: dict[str, ColumnLayout] | None = None,
) -> Stage1Result:
    """Learn the logits; returns the score table arrays and the optimisation record.

    ``checkpoint``: file for periodic optimizer checkpoints; an existing one is resumed only if it
    was written under the same ``checkpoint_key`` (model, text and settings), else started over.
    ``stop_after``: stop (as if killed) after this many steps, for resumption tests.
    ``rank``/``shard``/``all_reduce``: data parallelism (``gamma.distributed``). ``shard`` is
    (the calibration indices whose teacher rows this process holds, in row order; the total
    number of sequences); every process draws the same step batches, takes the part it holds,
    and ``all_reduce`` sums the logit gradients, so all processes take identical steps. Only
    rank 0 writes checkpoints.
    ``layouts``: column-block granularity; one row of logits per block of every module, in
    module order (``init_logits`` and the returned table likewise), the candidates laid out as
    each module's layout says.
    """
    t_start = time.perf_counter()
    dev = torch.device(device)
    runner = BlockRunner(model, dev)
    modules = list(candidates)
    modules_by_block: dict[int, list[int]] = {}
    for i, name in enumerate(modules):
        modules_by_block.setdefault(block_index(name), []).append(i)
    linear = dict(model.named_modules())
    # the logit rows of each module: its row (module level), or a slice of rows, one per column block
    rows: list[int | slice] = []
    row_names: list[str] = []
    sizes: list[int] = []
    for i, name in enumerate(modules):
        if layouts is None:
            rows.append(i)
            row_names.append(name)
            sizes.append(linear[name].weight.numel())
        else:
            layout = layouts[name]
            rows.append(slice(len(row_names), len(row_names) + layout.n_blocks))
            row_names += block_rows(name, layout.n_blocks)
            sizes += layout.block_sizes(linear[name].weight.shape[0])
    if cfg.init == "proxy" and init_logits is None:
        raise ValueError("stage1.init='proxy' needs init_logits from the Fisher proxy")
    init = torch.as_tensor(init_logits, dtype=torch.float32) if cfg.init == "proxy" else None
    logits = PreferenceLogits(row_names, bits, sizes, init).to(dev)
    optimizer = torch.optim.Adam([logits.alpha], lr=cfg.lr)
    lagrangian = AugmentedLagrangian(cfg.budget, 0.0, cfg.penalty, cfg.penalty_growth, cfg.penalty_max,
                                     cfg.multiplier_interval)
    history: dict[str, list[float]] = {k: [] for k in
                                       ("loss", "violation", "multiplier", "penalty", "expected_bits", "temperature")}
    start = 0
    ckpt = Path(checkpoint) if checkpoint else None
    state = torch.load(ckpt, weights_only=False) if ckpt and ckpt.exists() else None
    if state is not None and (state.get("key") != checkpoint_key or state["alpha"].shape != logits.alpha.shape):
        warnings.warn(f"{ckpt} belongs to another Stage I run (other model, text or settings): starting over",
                      stacklevel=2)
        state = None
    if state is not None:
        logits.alpha.data.copy_(state["alpha"])
        optimizer.load_state_dict(state["optimizer"])
        lagrangian.load_state_dict(state["lagrangian"])
        history, start = state["history"], state["step"]
    cands = _Candidates(candidates, layouts)
    full_length = teacher.hidden[0].shape[1]
    n_seq = shard[1] if shard else teacher.hidden[0].shape[0]
    held = shard[0].tolist() if shard else list(range(n_seq))
    row_of = {int(g): r for r, g in enumerate(held)}
    tokens = min(cfg.tokens_per_sequence, full_length)

    fisher = cfg.loss == "fisher"
    per_channel = channel_fisher(teacher.grads, n_seq, all_reduce) if fisher and cfg.fisher_weight == "channel" \
        else None

    steps = range(start, cfg.steps)
    for step in track(steps, f"Stage I ({cfg.relaxation}/{cfg.loss}, B={cfg.budget})", total=len(steps)):
        temperature = temperature_at(cfg, step)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        batch = torch.randperm(n_seq, generator=gen)[: cfg.sequences_per_step]
        mine = torch.tensor([row_of[int(g)] for g in batch if int(g) in row_of], dtype=torch.long)
        optimizer.zero_grad(set_to_none=True)
        if cfg.relaxation == "hard":
            mixes = logits.straight_through_samples(temperature, gen, cfg.samples, cfg.antithetic)
        else:
            mixes = [logits.probabilities(temperature)]
        mix_grads = [torch.zeros_like(m) for m in mixes]
        step_loss = 0.0
        for b, idx in modules_by_block.items():
            if len(mine) == 0:
                break
            block = runner.blocks[b]
            prefix = f"model.layers.{b}."
            mixed = {modules[i][len(prefix):]: MixedLinear(
                cands.dense(modules[i], dev), linear[modules[i]].bias,
                None if layouts is None else layouts[modules[i]].columns.to(dev)) for i in idx}
            x = teacher.hidden[b][mine, :tokens].to(dev)
            y = teacher.hidden[b + 1][mine, :tokens].to(dev)
            g2 = None
            if fisher:
                g2 = per_channel[b].to(dev) if per_channel is not None else \
                    teacher.grads[b][mine, :tokens].to(dev).float().pow(2)
            for mix, mix_grad in zip(mixes, mix_grads):  # the step's loss is the mean over the draws
                for i in idx:
                    mixed[modules[i][len(prefix):]].set_mix(mix[rows[i]])
                with swapped(block, mixed), torch.enable_grad():
                    err = block_error(cfg.loss, runner.run_block(b, x), x, y, g2, full_length) \
                        * len(mine) / len(batch) / len(mixes)
                    err.backward()
                for i in idx:
                    mix_grad[rows[i]] = mixed[modules[i][len(prefix):]].mix_grad()
                step_loss += float(err.detach())
        if all_reduce is not None:
            mix_grads = [all_reduce(g) for g in mix_grads]
            step_loss = float(all_reduce(torch.tensor([step_loss], dtype=torch.float64))[0])
        expected = logits.expected_bits(temperature)
        if step == 0 and cfg.multiplier_init == "feasible" and start == 0:
            g_loss = torch.autograd.grad(mixes, logits.alpha, mix_grads, retain_graph=True)[0]
            g_c = torch.autograd.grad(expected, logits.alpha, retain_graph=True)[0]
            lagrangian.multiplier = AugmentedLagrangian.feasible_multiplier(g_loss, g_c)
        torch.autograd.backward([*mixes, lagrangian.term(expected)], [*mix_grads, None])
        optimizer.step()
        violation = float(expected.detach()) - cfg.budget
        lagrangian.observe(violation)
        for k, v in (("loss", step_loss), ("violation", violation), ("multiplier", lagrangian.multiplier),
                     ("penalty", lagrangian.penalty), ("expected_bits", float(expected.detach())),
                     ("temperature", temperature)):
            history[k].append(v)
        done = step + 1
        if ckpt and rank == 0 and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            _save_checkpoint(ckpt, logits, optimizer, lagrangian, history, done, checkpoint_key)
        if stop_after is not None and done - start >= stop_after:
            break

    final_t = temperature_at(cfg, cfg.steps - 1)
    with torch.no_grad():
        expected = float(logits.expected_bits(final_t))
    alpha = logits.alpha.detach().cpu().double().numpy()
    history["violation_before_polish"] = [expected - cfg.budget]
    if abs(expected - cfg.budget) > cfg.tolerance:
        # Short runs end before the multiplier has settled: finish with the price that meets the budget.
        alpha, mu = price_shift(alpha, sizes, bits, cfg.budget, final_t)
        history["final_price"] = [mu]
        logits.alpha.data.copy_(torch.from_numpy(alpha))
        with torch.no_grad():
            expected = float(logits.expected_bits(final_t))
    return Stage1Result(
        scores=logits.scores(final_t).cpu().double().numpy(),
        probabilities=logits.probabilities(final_t).detach().cpu().double().numpy(),
        expected_bits=expected,
        multiplier=lagrangian.multiplier,
        penalty=lagrangian.penalty,
        violation=expected - cfg.budget,
        history=history,
        wall_seconds=time.perf_counter() - t_start,
        peak_memory_mb=_peak_memory_mb(),
        resumed_from=start,
    )


def _save_checkpoint(path: Path, logits, optimizer, lagrangian, history, step: int, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    torch.save({"alpha": logits.alpha.detach().clone(), "optimizer": optimizer.state_dict(),
                "lagrangian": lagrangian.state_dict(), "history": history, "step": step, "key": key}, tmp)
    os.replace(tmp, path)

