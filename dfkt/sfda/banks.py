"""Feature / score memory banks shared by the neighbourhood methods (NRC, AaD)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import SFDAMethod, forward_with_features


class BankMethod(SFDAMethod):
    """SFDA method with an L2-normalised feature bank and a softmax score bank over the target,
    filled by one no-grad pass at setup and refreshed row-wise with every batch (tracked for resume)."""

    train_head = True
    needs_index = True

    def setup_extra(self) -> None:
        out = self.target_outputs()
        self.fea_bank = self.track("fea_bank", F.normalize(out["features"], dim=1).contiguous())
        self.score_bank = self.track("score_bank", F.softmax(out["logits"], 1).contiguous())

    def forward_and_update(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and softmax of the batch; the batch's bank rows take the new (detached) values."""
        with self.ctx.autocast():
            logits, feats = forward_with_features(self.net, self.ctx.parts.head, x)
        logits = logits.float()
        probs = F.softmax(logits, 1)
        with torch.no_grad():
            self.fea_bank[idx] = F.normalize(feats.detach().float(), dim=1)
            self.score_bank[idx] = probs.detach()
        return logits, probs
