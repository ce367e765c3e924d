"""Feature / score memory banks shared by the neighbourhood methods (NRC, AaD, AdaContrast)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.distributed import all_gather_cat
from ..core.neighbors import BankIndex
from .common import SFDAMethod, forward_with_features


class BankMethod(SFDAMethod):
    """SFDA method with an L2-normalised feature bank and a softmax score bank over the target,
    filled by one no-grad pass at setup and refreshed row-wise with every batch (tracked for resume).

    Neighbours are searched through ``self.index`` (``core.neighbors.BankIndex``): exact below 50k rows
    or on an accelerator, an approximate faiss index above (``train.neighbour_index`` overrides).
    The banks stay on the training device in the dtype of the model's parameters (float32 for the models
    here; autocast changes the compute only): the step's look-ups, gathers and writes then never leave the
    device, and the bank is as precise as the features it stores (README: "Targets of any size"). Under torchrun
    every rank keeps the whole bank and writes the all-gathered batch rows (``write_bank``), so the ranks'
    banks stay identical; no sharding: 1M rows of 256-d features + 345 class scores are 2.4 GB, which
    fits a training GPU, and a sharded bank would need a distributed top-k merge in every step.
    """

    train_head = True
    needs_index = True

    def setup_extra(self) -> None:
        out = self.target_outputs()
        dtype = next(self.ctx.learner.parameters()).dtype          # the model's dtype (float32 here)
        self.fea_bank = self.track("fea_bank", F.normalize(out["features"], dim=1).to(dtype).contiguous())
        self.score_bank = self.track("score_bank", F.softmax(out["logits"], 1).to(dtype).contiguous())
        self.index = BankIndex(self.fea_bank, self.ctx.train.neighbour_index, seed=self.ctx.train.seed)

    @torch.no_grad()
    def write_bank(self, idx: torch.Tensor, feats: torch.Tensor, probs: torch.Tensor) -> None:
        """Rows ``idx`` take the (L2-normalised) features and probabilities: every rank's batch rows."""
        idx = all_gather_cat(idx)
        self.fea_bank[idx] = F.normalize(all_gather_cat(feats.detach().float()), dim=1).to(self.fea_bank.dtype)
        self.score_bank[idx] = all_gather_cat(probs.detach().float()).to(self.score_bank.dtype)
        self.index.mark(idx)

    def epoch_begin(self, epoch: int) -> None:
        """An approximate index is rebuilt from the bank at every epoch (the features have moved); the
        same happens after a resume, so a resumed run searches the same index as an uninterrupted one."""
        super().epoch_begin(epoch)
        self.index.reset()

    @torch.no_grad()
    def knn_vote(self, feats: torch.Tensor, k: int) -> torch.Tensor:
        """Soft kNN vote: the mean bank probability of the ``k`` nearest bank rows (cosine) of each feature."""
        _, idx = self.index.search(F.normalize(feats.float(), dim=1), k)
        return self.score_bank[idx].mean(1)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.index.reset()                        # resumed banks: the index is rebuilt from them

    def forward_and_update(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and softmax of the batch; the batch's bank rows take the new (detached) values."""
        with self.ctx.autocast():
            logits, feats = forward_with_features(self.net, self.ctx.parts.head, x)
        logits = logits.float()
        probs = F.softmax(logits, 1)
        self.write_bank(idx, feats, probs)
        return logits, probs
