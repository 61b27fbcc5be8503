"""Stage I's training loop: learn, once, a preference over candidate bit widths for every row.

A plain loop: draw the batch, teacher-forced loss per block (or the end-to-end KL:
``end_to_end.py``), constraint, step, log, checkpoint.
Each step streams through the blocks: only one block's candidates and activations are resident
on the compute device; the block's teacher-forced reconstruction loss is backpropagated to its
logits; the gradients of all logits accumulate, and one Adam step follows, with the augmented
Lagrangian holding the expected average bits to the training budget. Weights are never updated:
only the logits. The row layout (``rows.py``), resumption (``checkpoint.py``) and data-parallel
sharding (``shard.py``) are the small pieces it is built from.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gamma.config import END_TO_END_LOSSES, Stage1Config
from gamma.model.blocks import BlockRunner
from gamma.model.loading import block_index
from gamma.progress import console, track
from gamma.stage1.checkpoint import Checkpoint
from gamma.stage1.end_to_end import EndToEnd
from gamma.stage1.lagrangian import AugmentedLagrangian, price_shift
from gamma.stage1.loss import block_error, channel_fisher
from gamma.stage1.relaxation import MixedLinear, PreferenceLogits, swapped
from gamma.stage1.rows import LogitRows
from gamma.stage1.shard import Shard
from gamma.stage1.teacher import TeacherData

HISTORY = ("loss", "violation", "multiplier", "penalty", "expected_bits", "temperature")


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


def learn_preferences(model: nn.Module, teacher: TeacherData, rows: LogitRows, cfg: Stage1Config,
                      init_logits: np.ndarray | None = None, *, shard: Shard | None = None,
                      checkpoint: Checkpoint | None = None, device: str = "cpu") -> Stage1Result:
    """Learn the logits of ``rows``; returns the score table arrays and the optimisation record.
    ``init_logits``: the proxy start (``stage1.init: proxy``); ``shard``: this process's part of
    the calibration sequences (every process draws the same step batches, takes the part it
    holds, and the logit gradients are summed, so all processes take identical steps; only rank 0
    writes checkpoints); ``checkpoint``: resumed if it belongs to this run, saved every
    ``stage1.checkpoint_every`` steps."""
    t_start = time.perf_counter()
    dev = torch.device(device)
    shard = shard or Shard(sequences=teacher.hidden[0].shape[0])
    if cfg.init == "proxy" and init_logits is None:
        raise ValueError("stage1.init='proxy' needs init_logits from the Fisher proxy")
    init = torch.as_tensor(init_logits, dtype=torch.float32) if cfg.init == "proxy" else None
    logits = PreferenceLogits(rows.names, rows.bits, rows.sizes, init).to(dev)
    optimizer = torch.optim.Adam([logits.alpha], lr=cfg.lr)
    lagrangian = AugmentedLagrangian(cfg.budget, 0.0, cfg.penalty, cfg.penalty_growth, cfg.penalty_max,
                                     cfg.multiplier_interval)
    history, start = checkpoint.resume(logits, optimizer, lagrangian) if checkpoint else (None, 0)
    history = history or {k: [] for k in HISTORY}
    if start:
        console.print(f"Stage I (B={cfg.budget}): resumed from step {start} of {cfg.steps} ({checkpoint.path})")
    last_save = time.perf_counter()
    forcing = TeacherForcing(BlockRunner(model, dev), teacher, rows, cfg, shard)
    if cfg.loss in END_TO_END_LOSSES:
        forcing = EndToEnd(forcing)

    steps = range(start, cfg.steps)
    for step in track(steps, f"Stage I ({cfg.relaxation}/{cfg.loss}, B={cfg.budget})", total=len(steps)):
        temperature = temperature_at(cfg, step)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        batch = torch.randperm(shard.sequences, generator=gen)[: cfg.sequences_per_step]
        optimizer.zero_grad(set_to_none=True)
        if cfg.relaxation == "hard":
            mixes = logits.straight_through_samples(temperature, gen, cfg.samples, cfg.antithetic)
        else:
            mixes = [logits.probabilities(temperature)]
        mix_grads, step_loss = forcing.loss_gradients(mixes, batch)
        expected = logits.expected_bits(temperature)
        if step == 0 and start == 0 and cfg.multiplier_init == "feasible":
            g_loss = torch.autograd.grad(mixes, logits.alpha, mix_grads, retain_graph=True)[0]
            g_c = torch.autograd.grad(expected, logits.alpha, retain_graph=True)[0]
            lagrangian.multiplier = AugmentedLagrangian.feasible_multiplier(g_loss, g_c)
        torch.autograd.backward([*mixes, lagrangian.term(expected)], [*mix_grads, None])
        optimizer.step()
        violation = float(expected.detach()) - cfg.budget
        lagrangian.observe(violation)
        for k, v in zip(HISTORY, (step_loss, violation, lagrangian.multiplier, lagrangian.penalty,
                                  float(expected.detach()), temperature)):
            history[k].append(v)
        done = step + 1
        due = done % cfg.checkpoint_every == 0 or done == cfg.steps or \
            time.perf_counter() - last_save >= cfg.checkpoint_seconds
        if checkpoint and shard.rank == 0 and due:
            checkpoint.save(logits, optimizer, lagrangian, history, done)
            last_save = time.perf_counter()
        if checkpoint and checkpoint.stop_after is not None and done - start >= checkpoint.stop_after:
            break
    return finish(logits, lagrangian, history, rows, cfg, (t_start, start))


class TeacherForcing:
    """Each block of the step's batch fed its full-precision input, its mixed weights set from the
    logits, and its reconstruction error backpropagated to the mixes; one block on the device."""

    def __init__(self, runner: BlockRunner, teacher: TeacherData, rows: LogitRows, cfg: Stage1Config, shard: Shard):
        self.runner, self.teacher, self.rows, self.cfg, self.shard = runner, teacher, rows, cfg, shard
        self.full_length = teacher.hidden[0].shape[1]
        self.tokens = min(cfg.tokens_per_sequence, self.full_length)
        per_channel = cfg.loss == "fisher" and cfg.fisher_weight == "channel"
        self.per_channel = channel_fisher(teacher.grads, shard.sequences, shard) if per_channel else None
        self.linear = dict(runner.model.named_modules())
        # (block, module name within it) -> its logit row (or rows: column blocks)
        self.row_of = {(block_index(m), m[len(f"model.layers.{block_index(m)}."):]): rows.of_module[i]
                       for i, m in enumerate(rows.modules)}

    def loss_gradients(self, mixes: list[torch.Tensor], batch: torch.Tensor) -> tuple[list[torch.Tensor], float]:
        """``dL/dmix`` for each draw (summed over processes) and the step's loss (the mean over draws)."""
        mine = self.shard.rows(batch)
        mix_grads = [torch.zeros_like(m) for m in mixes]
        step_loss = 0.0
        for b, idx in self.rows.by_block.items():
            if len(mine) == 0:
                break
            step_loss += self.block(b, idx, mine, len(batch), mixes, mix_grads)
        return self.summed(mix_grads, step_loss)

    def summed(self, mix_grads: list[torch.Tensor], step_loss: float) -> tuple[list[torch.Tensor], float]:
        """This process's mix gradients and loss summed over the data-parallel processes."""
        if self.shard.all_reduce is None:
            return mix_grads, step_loss
        return [self.shard.sum(g) for g in mix_grads], \
            float(self.shard.sum(torch.tensor([step_loss], dtype=torch.float64))[0])

    def mixed_block(self, b: int, mix: torch.Tensor | None = None) -> dict[str, MixedLinear]:
        """Block ``b``'s modules as ``MixedLinear`` (names relative to the block), set to ``mix``."""
        rows, dev = self.rows, self.runner.device
        mixed = {}
        for i in rows.by_block.get(b, []):
            name = rows.modules[i]
            mixed[name[len(f"model.layers.{b}."):]] = module = MixedLinear(
                rows.dense(name, dev), self.linear[name].bias, rows.columns(name, dev))
            if mix is not None:
                module.set_mix(mix[rows.of_module[i]])
        return mixed

    def block(self, b: int, idx: list[int], mine: torch.Tensor, batch_size: int, mixes, mix_grads) -> float:
        runner = self.runner
        x = runner.to_device(self.teacher.hidden[b][mine, :self.tokens])
        y = runner.to_device(self.teacher.hidden[b + 1][mine, :self.tokens])
        g2 = None
        if self.cfg.loss == "fisher":
            g2 = self.per_channel[b].to(runner.device) if self.per_channel is not None else \
                runner.to_device(self.teacher.grads[b][mine, :self.tokens]).pow(2)
        loss = 0.0
        with runner.resident(runner.blocks[b]):
            mixed = self.mixed_block(b)
            for mix, mix_grad in zip(mixes, mix_grads):
                for name, module in mixed.items():
                    module.set_mix(mix[self.row_of[b, name]])
                with swapped(runner.blocks[b], mixed), torch.enable_grad():
                    err = block_error(self.cfg.loss, runner.run_block(b, x), x, y, g2, self.full_length) \
                        * len(mine) / batch_size / len(mixes)
                    err.backward()
                for name, module in mixed.items():
                    mix_grad[self.row_of[b, name]] += module.mix_grad()  # a unit's members add up
                loss += float(err.detach())
        return loss


def finish(logits: PreferenceLogits, lagrangian: AugmentedLagrangian, history: dict, rows: LogitRows,
           cfg: Stage1Config, timing: tuple[float, int]) -> Stage1Result:
    """The table at the final temperature; a run that ends off budget is finished with the price
    per bit that meets it (short runs end before the multiplier has settled)."""
    t_start, start = timing
    final_t = temperature_at(cfg, cfg.steps - 1)
    with torch.no_grad():
        expected = float(logits.expected_bits(final_t))
    history["violation_before_polish"] = [expected - cfg.budget]
    if abs(expected - cfg.budget) > cfg.tolerance:
        alpha, mu = price_shift(logits.alpha.detach().cpu().double().numpy(), rows.sizes, rows.bits, cfg.budget,
                                final_t)
        history["final_price"] = [mu]
        logits.alpha.data.copy_(torch.from_numpy(alpha))
        with torch.no_grad():
            expected = float(logits.expected_bits(final_t))
    return Stage1Result(
        scores=logits.scores(final_t).cpu().double().numpy(),
        probabilities=logits.probabilities(final_t).detach().cpu().double().numpy(),
        expected_bits=expected, multiplier=lagrangian.multiplier, penalty=lagrangian.penalty,
        violation=expected - cfg.budget, history=history, wall_seconds=time.perf_counter() - t_start,
        peak_memory_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, resumed_from=start,
    )
