"""One optimizer step of the trainer: two SimCLR views of every image, ID and OE views through ONE
forward pass (BatchNorm sees both), the global NT-Xent + α·mean‖z_oe‖ loss through
`kernels.ntxent_oe`, backward and the parameter update."""

from __future__ import annotations

import torch
from torch import nn

from kernels import NTXentOEOutput, ntxent_oe
from oecl_train.augment import SimCLRAugment
from oecl_train.config import TrainConfig
from oecl_train.distributed import Dist
from oecl_train.execution import Execution, autocast
from oecl_train.optim import cosine_lr


class StepMixin:
    """The step of `Trainer`, which sets these attributes."""

    cfg: TrainConfig
    execution: Execution
    device: torch.device
    dist: Dist
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    augment: SimCLRAugment
    total_steps: int
    alpha_warmup_steps: int
    lr_warmup_steps: int

    def _step(self, step: int, x_id: torch.Tensor, x_oe: torch.Tensor | None) -> dict:
        cfg = self.cfg
        alpha = cfg.alpha if step >= self.alpha_warmup_steps else 0.0
        lr = cosine_lr(step, self.total_steps, cfg.lr, self.lr_warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        parts = [self.augment(x_id), self.augment(x_id)]
        if x_oe is not None:
            parts += [self.augment(x_oe), self.augment(x_oe)]
        views = torch.cat(parts).contiguous(memory_format=torch.channels_last)
        out = self.loss_on_views(views, len(x_id), alpha)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(out.loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            out.loss.backward()
            self.optimizer.step()
        return {
            "loss": out.loss.detach(),
            "contrastive": out.contrastive,
            "id_norm": out.id_norm,
            "oe_norm": out.oe_norm,
            "alpha": alpha,
            "lr": lr,
        }

    def gathered_features(self, z: torch.Tensor, n_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's features [id view 1 (n_id), id view 2 (n_id), OE views] → the global
        (z_id, z_oe): z_id = cat[view 1 of all ranks, view 2 of all ranks], so rows i and
        i + N/2 stay the two views of one image, and z_oe holds every rank's OE views.
        One all-gather (with gradients) for all three parts."""
        if self.dist.world == 1:
            return z[: 2 * n_id], z[2 * n_id :]
        g = self.dist.gather(z).view(self.dist.world, len(z), z.shape[1])
        z_id = torch.cat([g[:, :n_id], g[:, n_id : 2 * n_id]]).flatten(0, 1)
        return z_id, g[:, 2 * n_id :].flatten(0, 1)

    def loss_on_views(self, views: torch.Tensor, n_id: int, alpha: float) -> NTXentOEOutput:
        """The global OECL loss of one step from this rank's views [id₁, id₂, oe₁, oe₂].

        Identical on every rank (all features are gathered); with DDP's gradient averaging the
        parameter gradient is that of one process on the concatenated global batch.
        """
        with autocast(self.device, self.execution.precision):
            z = self.model(views)
        z_id, z_oe = self.gathered_features(z.float(), n_id)
        return ntxent_oe(z_id, z_oe, self.cfg.temperature, alpha, backend=self.cfg.loss_backend)
