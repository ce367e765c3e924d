"""Options every compress recipe shares: the adaptation stage's method and the student stage's schedule."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class StageOptions:
    adapt: str = "cowa"                # the SFDA method of the adaptation stage: sfda-shifts' best held-out
    #                                    mean at its registered defaults (cowa 85.8 %, nrc 83.8 %; on the six
    #                                    compress-shifts tasks 83.5 against 80.8, in half nrc's time); any
    #                                    `dfkt list --task sfda` name
    adapt_options: dict = field(default_factory=dict)   # its options / training settings (dfkt.adapt's)
    student_epochs: int = 30           # passes over the target of the student stage ...
    student_min_steps: int = 900       # ... and at least this many student steps (the size rule: a student
    #                                    trained from scratch needs ~900 SGD steps whatever the target's size,
    #                                    so a target of fewer than 30 x 900 / 64 images gets more passes)
    student_lr: float = 0.05           # the student's SGD lr (cosine, 5 % warm-up)
    student_batch_size: int = 64
    temperature: float = 1.0           # KD temperature

    def validate(self, where: str = "options") -> None:
        from ..registry import get_method

        get_method(self.adapt, task="sfda")          # an unknown name: ConfigError with close matches
        for k in ("student_epochs", "student_batch_size", "student_min_steps"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{where}.{k} must be >= 1, got {getattr(self, k)}.")
        if not self.student_lr > 0 or not self.temperature > 0:
            raise ConfigError(f"{where}: student_lr and temperature must be > 0 (got {self.student_lr}, "
                              f"{self.temperature}).")
