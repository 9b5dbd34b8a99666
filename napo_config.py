"""NAPOConfig: the options of S-DPO / NAPO and their defaults, written here once.

Everything else reads them from here: softmax_dpo.main's flags take their defaults from NAPOConfig's fields,
reproduce.py's NAPO / S-DPO flag sets are NAPOConfig's values, and whether a run needs the SASRec is
NAPOConfig.needs_sasrec. Imports nothing heavy (no torch), so `--help` and reproduce.py stay light.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import cli


@dataclass
class NAPOConfig:
    """NAPO options; the defaults are the NAPO authors' (K=3, ρ=0.7, γ0=1, α=0.3, m=0.9, β=1, reference-free)."""
    num_negatives: int = 3          # K own negatives per example (1..19: cli.RULES)
    beta: float = 1.0               # the one β: NAPOTrainer copies it into TRL's DPOConfig
    reference: bool = False         # True: r = β(logπθ − logπref) (S-DPO); False: r = β·logπθ (authors' NAPO)
    share_negatives: bool = True    # in-batch negative sharing
    rho: float = 0.7                # share the negatives of the top floor(ρ(B−1)) most similar examples
    margin_mode: str = "user"       # 'user' (personalised), 'batch' (one per batch, corrected), 'authors'
                                    # (the authors' code as it is: napo_trainer.authors_objective), 'none'
    gamma0: float = 1.0
    alpha: float = 0.3
    momentum: float = 0.9           # EMA momentum m of the running mean M̄
    clamp_margin: bool = True       # clamp γ at 0
    shared_scoring: bool = True     # encode each prompt once (False: naive prompt+answer concatenation)

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
