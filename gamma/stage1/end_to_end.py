"""Stage I's end-to-end losses, every block fed its mixed predecessors' outputs and the loss's
gradient carried back through every block to every module's mix: ``stage1.loss: end_to_end``, the
KL divergence of the mixed model's next-token distribution from the full-precision model's, and
``next_token``, the mixed model's next-token loss on the calibration text's own tokens.

Why the second: the KL scores fidelity to the full-precision model, perplexity scores the text's
tokens, and the two can rank allocations differently (GPTQ at 4.5 bits on the embedded model: an
allocation behind on perplexity while level or ahead on KL, docs/serving_profiles.md).

Why end to end at all: the teacher-forced losses add up each block's own error at full-precision
inputs, so they cannot see how the errors of low-width blocks compound through the blocks after
them (2-bit RTN on the embedded model: every block-local estimate prices it far below what it costs
end to end).

Memory stays one block: forward block by block with each block's (mixed) input kept on the host,
the loss at the head, then backward block by block in reverse, each block's mixed weights built
again and the block recomputed from its stored input (the teacher capture's pattern). Per step
this builds every block's dense candidates twice (unless ``LogitRows.dense`` caches them) and
runs each block three times (forward, recomputed forward, backward), against once and twice for
teacher forcing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gamma.stage1.relaxation import swapped


def next_token_nll(student_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of ``student_logits`` [N, T, V] on ``tokens`` [N, >= T]: position t
    predicts token t + 1, so a last position with no token after it is left out."""
    n = min(student_logits.shape[1], tokens.shape[1] - 1)
    return F.cross_entropy(student_logits[:, :n].float().flatten(0, 1), tokens[:, 1 : n + 1].flatten())


def next_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(teacher || student)`` of the next-token distributions."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(dim=-1).mean()


class EndToEnd:
    """``loss_gradients(mixes, batch)`` as ``loop.TeacherForcing`` gives it, from the final KL or
    next-token loss."""

    def __init__(self, forcing):
        # the teacher-forced helper holds the runner, teacher, rows, config and shard this needs too
        self.forcing = forcing
        self.labelled = forcing.cfg.loss == "next_token"  # the text's tokens are the target, not the teacher
        self.final = next_token_nll if self.labelled else next_token_kl

    def loss_gradients(self, mixes: list[torch.Tensor], batch: torch.Tensor) -> tuple[list[torch.Tensor], float]:
        f = self.forcing
        mine = f.shard.rows(batch)
        mix_grads = [torch.zeros_like(m) for m in mixes]
        step_loss = 0.0
        if len(mine):
            target = self._target(mine)
            share = len(mine) / len(batch) / len(mixes)
            for mix, mix_grad in zip(mixes, mix_grads):
                step_loss += self._one_draw(mix, mix_grad, mine, target, share)
        return f.summed(mix_grads, step_loss)

    @torch.no_grad()
    def _target(self, mine: torch.Tensor) -> torch.Tensor:
        """The full-precision model's logits (end_to_end) or the sequences' tokens (next_token)."""
        f = self.forcing
        if self.labelled:
            return f.teacher.tokens[mine].to(f.runner.device)
        return f.runner.head(f.runner.to_device(f.teacher.hidden[-1][mine, :f.tokens]))

    def _one_draw(self, mix: torch.Tensor, mix_grad: torch.Tensor, mine: torch.Tensor, target: torch.Tensor,
                  share: float) -> float:
        f, runner = self.forcing, self.forcing.runner
        h = runner.to_device(f.teacher.hidden[0][mine, :f.tokens])
        inputs = []
        with torch.no_grad():
            for b in range(len(runner.blocks)):  # a block without quantized modules runs as it is
                inputs.append(h.cpu())
                with runner.resident(runner.blocks[b]), swapped(runner.blocks[b], f.mixed_block(b, mix)):
                    h = runner.run_block(b, h)
        h = h.requires_grad_(True)
        with torch.enable_grad():
            loss = self.final(runner.head(h), target) * share
            loss.backward()
        grad = h.grad
        for b in reversed(range(len(runner.blocks))):
            x = inputs.pop()
            x = runner.to_device(x).requires_grad_(b > 0)
            mixed = f.mixed_block(b, mix)
            with runner.resident(runner.blocks[b]), swapped(runner.blocks[b], mixed), torch.enable_grad():
                out = runner.run_block(b, x)
                if out.requires_grad:  # else: no mix in this block or below, and no input gradient wanted
                    out.backward(grad)
            for name, module in mixed.items():
                mix_grad[f.row_of[b, name]] += module.mix_grad()  # a unit's members add up
            grad = x.grad
        return float(loss.detach())
