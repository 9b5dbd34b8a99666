"""NAPOConfig: the options of S-DPO / NAPO and their defaults, written here once.

Everything else reads them from here: softmax_dpo.main's flags take their defaults from NAPOConfig's fields,
reproduce.py's NAPO / S-DPO flag sets are NAPOConfig's values, and whether a run needs the SASRec is
NAPOConfig.needs_sasrec. Imports nothing heavy (no torch), so `--help` and reproduce.py stay light.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import cli

MARGIN_MODES = ("user", "batch", "authors", "none")  # NAPOConfig.margin_mode (napo_losses.dynamic_margin)
cli.add_rules(margin_mode=cli.Rule(choices=MARGIN_MODES))


@dataclass
class NAPOConfig:
    """NAPO options; the defaults are the NAPO authors' (K=3, ρ=0.7, γ0=1, α=0.3, m=0.9, β=1, reference-free)."""
    num_negatives: int = field(default=3, metadata={"help": "K, the row's own negatives (1..19), drawn from its 19 "
                                                             "non-target candidates"})
    beta: float = field(default=1.0, metadata={"help": "beta, the reward scale r = beta * log-prob (ratio)"})
    reference: bool = field(default=False, metadata={"help": "True: rewards against the frozen SFT model (S-DPO); "
                                                             "False: reference-free (the NAPO authors')"})
    share_negatives: bool = field(default=True, metadata={"help": "in-batch negative sharing between similar users "
                                                                  "(their rewards detached)"})
    rho: float = field(default=0.7, metadata={"help": "share the negatives of the floor(rho*(B-1)) most similar "
                                                      "examples of the global batch"})
    margin_mode: str = field(default="user", metadata={"help": "the margin: user (personalised), batch (one per "
                                                               "batch), authors (the authors' code as it is), none"})
    gamma0: float = field(default=1.0, metadata={"help": "gamma0, the margin's base value"})
    alpha: float = field(default=0.3, metadata={"help": "alpha, how much the SASRec score moves the margin "
                                                        "(0: a fixed margin gamma0)"})
    momentum: float = field(default=0.9, metadata={"help": "momentum m of the running mean of the SASRec scores"})
    clamp_margin: bool = field(default=True, metadata={"help": "clamp the margin at 0"})
    shared_scoring: bool = field(default=True, metadata={"help": "encode each prompt once for its 1+K answers "
                                                                 "(False: one prompt+answer row each, for checks)"})

    @classmethod
    def from_options(cls, options: dict) -> "NAPOConfig":
        """The config of those `options` (e.g. a stage's keyword arguments) that are NAPOConfig fields; the
        fields not among them keep their defaults."""
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})

    def validate(self):
        """The options' rules of the command line (cli.RULES: K, rho, margin mode, momentum, beta, gamma0)."""
        cli.check_options(asdict(self))

    @property
    def needs_sasrec(self) -> bool:
        """Sharing or a margin needs the frozen SASRec (plain S-DPO does not)."""
        return self.share_negatives or self.margin_mode != "none"


DEFAULTS = NAPOConfig()
