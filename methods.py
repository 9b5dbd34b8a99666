"""The experiment table: every method of the comparison as one row (its stage, the adapter it starts from, its
own flags, a label and a group), the rows per stage, the validation-chosen settings (TUNED), the knob study's
starting point, and the validation sweep's grid. reproduce.py plans, runs and records these rows; report.py turns
what they wrote into statistics and tables; nothing here runs anything.
"""
from __future__ import annotations

from errors import DataError
from napo_config import DEFAULTS as NAPO_DEFAULTS

# ==================================================================================================
# THE TABLE — every stage's options live here. Tune the CPU run by editing these dicts.
# ==================================================================================================

DATASET = "lastfm"
SEED = 0
PROTOCOLS = ("clean", "sdpo")  # every method is evaluated under both; `clean` is the one the claims use

# Rows per stage: SFT / preference training rows (first N train rows) and test rows (-1 = all 2,495).
SCALE = dict(sft_rows=16384, pref_rows=2048, test_rows=-1, val_rows=-1)  # sft_rows: the Results' (the quick start: 8,192)
# --quick: a small model built in seconds and a few rows (tests/conftest.py builds the same model).
QUICK_SCALE = dict(sft_rows=256, pref_rows=64, test_rows=32, val_rows=32)  # val_rows: the sweep's (sweep)
QUICK_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, pretrain_epochs=1, pretrain_recall=1.0, pretrain_lr=5e-3,
                   pretrain_max_steps=150, probe_rows=100)

# Options every run of a stage puts on its command line, before the method's own flags (so a recorded command
# says what it ran with). DEFAULT: the stage's own default, read from its function's signature (the one place
# it is written); a value is this table's own choice, with the reason beside it.
DEFAULT = object()
STAGE_FUNCTIONS = {"sft": "sft.main", "dpo": "dpo.main", "softmax_dpo": "softmax_dpo.main",
                   "inference": "inference.main", "sasrec": "sasrec.train"}
STAGE_FLAGS = {
    "sft": dict(batch_size=DEFAULT, learning_rate=DEFAULT, num_train_epochs=DEFAULT, logging_steps=DEFAULT),
    # preference runs are short (128 steps): log every 5 for the training curves
    "dpo": dict(batch_size=DEFAULT, learning_rate=DEFAULT, num_train_epochs=DEFAULT, beta=DEFAULT, logging_steps=5),
    "softmax_dpo": dict(batch_size=DEFAULT, learning_rate=DEFAULT, num_train_epochs=DEFAULT, beta=DEFAULT,
                        logging_steps=5),
    "inference": dict(batch_size=DEFAULT, generative=DEFAULT, constrained=DEFAULT, progress=False),  # no bar in logs
    # SASRec (sasrec.py train): no time budget, so the same seed gives the same model on any machine load
    "sasrec": dict(epochs=DEFAULT, time_budget_s=None),
}
# --quick overrides (the small model learns nothing at lr 1e-4 in a few steps; log every step for the curves)
QUICK_STAGE_FLAGS = {
    "sft": dict(learning_rate=3e-3, logging_steps=1),
    "dpo": dict(learning_rate=1e-3, logging_steps=1),
    "softmax_dpo": dict(learning_rate=1e-3, logging_steps=1),
    "sasrec": dict(epochs=1, max_train_samples=4000),
}

# Equal budgets: every preference stage and SFT continued (`sft_cont`) train on the same `pref_rows` rows with
# the same batch, accumulation and epochs, so they take the same number of optimizer steps and "preference
# optimisation beats more SFT" is a fair question. The values are softmax_dpo.py's (NAPO's stage): its
# signature is their one home; dpo.py (default batch 8) and sft.py get them on their command lines.
BUDGET_KEYS = ("batch_size", "gradient_accumulation_steps", "num_train_epochs")


# The settings chosen on the validation split, per method family: `python reproduce.py sweep` (SWEEP and
# SWEEP_RULE below) wrote TUNED_SWEEP (sweep.json, beside it sweep.md), their evidence; copied here by hand, and a
# test checks that this dict is that sweep's choice. Every method of a family runs with them (S-DPO's K sweep, all
# of NAPO's ablations and sweeps). Chosen on today's default build (tiny-494293f6b263, 2026-12-05): every family
# picks its smallest learning rate, no candidate beats the SFT adapter on validation by more than 0.0011 (the
# identity of docs/method.md at work); builder 6's choice is in results/history/builder6/sweep.json.
TUNED_SWEEP = "results/sweep.json"
TUNED = {
    "dpo": dict(learning_rate=3e-5, beta=1.0),
    "sdpo": dict(learning_rate=3e-5, beta=1.0),
    "napo": dict(learning_rate=3e-5, beta=0.1),
    "sft_cont": dict(learning_rate=1e-4),
}

# NAPO with its defaults (napo_config.NAPOConfig, written there once) and S-DPO = NAPO's pieces switched off
NAPO = {**{k: getattr(NAPO_DEFAULTS, k) for k in ("num_negatives", "share_negatives", "rho", "margin_mode", "gamma0",
                                                  "alpha", "momentum", "reference")}, **TUNED["napo"]}
SDPO = dict(num_negatives=NAPO_DEFAULTS.num_negatives, share_negatives=False, margin_mode="none", reference=True,
            **TUNED["sdpo"])

# The knob study's one learning rate and its starting point (METHODS' knob_* rows)
KNOB_LR = 1e-4
KNOB_START = dict(num_negatives=19, reference=False, beta=1.0, share_negatives=False, margin_mode="none",
                  learning_rate=KNOB_LR)

# The ablations, sweeps and the leak model are compared on ranking HR@1 only: generative and constrained
# decoding cost ~3x the ranking pass; the main methods show both (free generation is where they differ).
RANKING_ONLY = dict(generative=False, constrained=False)

# method -> stage, the SFT adapter it starts from, its own flags, a label and a group; eval_flags are
# added to its inference.py commands.
#   stage: sasrec | baseline (reproduce.py baseline) | sft | dpo | softmax_dpo
METHODS = {
    "sasrec": dict(stage="sasrec", label="SASRec", group="baseline"),
    "most_popular": dict(stage="baseline", label="Most popular candidate", group="baseline",
                         flags=dict(kind="most_popular")),
    "heuristic": dict(stage="baseline", label="Seeded-candidate heuristic (no learning)", group="leak",
                      flags=dict(kind="seeded_candidates")),
    "sft": dict(stage="sft", label="SFT", group="main"),
    # the control of the preference stages: SFT continued from the SFT adapter on their rows, at their budget
    "sft_cont": dict(stage="sft", start="sft", label="SFT continued", group="main", flags=TUNED["sft_cont"]),
    "sft_sdpo": dict(stage="sft", label="SFT trained on sdpo candidates", group="leak",
                     flags=dict(protocol="sdpo"), eval_flags=RANKING_ONLY),
    "dpo": dict(stage="dpo", start="sft", label="DPO", group="main", flags=TUNED["dpo"]),
    "sdpo": dict(stage="softmax_dpo", start="sft", label="S-DPO (K=3)", group="main", flags=SDPO),
    "napo": dict(stage="softmax_dpo", start="sft", label="NAPO", group="main", flags=NAPO),
    # ablations of NAPO
    "napo_noshare": dict(stage="softmax_dpo", start="sft", label="NAPO, no sharing", group="ablation",
                         flags={**NAPO, "share_negatives": False}, eval_flags=RANKING_ONLY),
    "napo_fixed_margin": dict(stage="softmax_dpo", start="sft", label="NAPO, fixed margin (alpha=0)",
                              group="ablation", flags={**NAPO, "alpha": 0.0}, eval_flags=RANKING_ONLY),
    "napo_batch_margin": dict(stage="softmax_dpo", start="sft", label="NAPO, batch margin", group="ablation",
                              flags={**NAPO, "margin_mode": "batch"}, eval_flags=RANKING_ONLY),
    # the authors' code as it is (napo_trainer.authors_objective): what this project's corrections are worth
    "napo_authors": dict(stage="softmax_dpo", start="sft", label="NAPO, the authors' code", group="ablation",
                         flags={**NAPO, "margin_mode": "authors"}, eval_flags=RANKING_ONLY),
    # number of own negatives K (K=3 is `sdpo` / `napo`)
    **{f"sdpo_k{k}": dict(stage="softmax_dpo", start="sft", label=f"S-DPO (K={k})", group="k_sweep",
                          flags={**SDPO, "num_negatives": k}, eval_flags=RANKING_ONLY) for k in (1, 7, 15)},
    **{f"napo_k{k}": dict(stage="softmax_dpo", start="sft", label=f"NAPO (K={k})", group="k_sweep",
                          flags={**NAPO, "num_negatives": k}, eval_flags=RANKING_ONLY) for k in (1, 7, 15)},
    # strength of the dynamic margin, personalised (`napo`: alpha=0.3) and per batch (`napo_batch_margin`: 0.3);
    # alpha=0 makes both the fixed margin gamma0, which is `napo_fixed_margin` (report.SWEEPS["alpha"])
    **{f"napo_alpha{a:g}": dict(stage="softmax_dpo", start="sft", label=f"NAPO (alpha={a:g})", group="alpha_sweep",
                                flags={**NAPO, "alpha": float(a)}, eval_flags=RANKING_ONLY) for a in (1, 3)},
    **{f"napo_batch_alpha{a:g}": dict(stage="softmax_dpo", start="sft", label=f"NAPO, batch margin (alpha={a:g})",
                                      group="alpha_sweep", flags={**NAPO, "margin_mode": "batch", "alpha": float(a)},
                                      eval_flags=RANKING_ONLY) for a in (1, 3)},
    # share of the batch whose negatives are shared (rho=0.7 is `napo`)
    "napo_rho05": dict(stage="softmax_dpo", start="sft", label="NAPO (rho=0.5)", group="rho_sweep",
                       flags={**NAPO, "rho": 0.5}, eval_flags=RANKING_ONLY),
    "napo_rho10": dict(stage="softmax_dpo", start="sft", label="NAPO (rho=1.0)", group="rho_sweep",
                       flags={**NAPO, "rho": 1.0}, eval_flags=RANKING_ONLY),
    # The knobs (docs/method.md, "SFT is listwise S-DPO"): on a model whose probability sits on the 20 candidates,
    # reference-free S-DPO over all 19 negatives at beta 1 without margin or sharing (`knob_start`) has SFT's loss
    # up to log P(candidates), so it should tie with SFT continued on the same rows, steps and learning rate
    # (`knob_sft_cont`). Each other row moves one knob away from that point; `knob_napo` is NAPO's defaults,
    # `knob_sdpo_ref` S-DPO as published (K=3, reference), `knob_dpo` TRL's DPO (K=1, reference): all at the
    # one learning rate KNOB_LR and the same budget, evaluated by ranking and free generation under `clean`.
    **{name: dict(spec, group="knobs", protocols=("clean",), eval_flags=dict(constrained=False))
       for name, spec in {
           "knob_sft_cont": dict(stage="sft", start="sft", label="SFT continued (knob study)",
                                 flags=dict(learning_rate=KNOB_LR)),
           "knob_start": dict(stage="softmax_dpo", start="sft", label="S-DPO K=19, reference-free, beta=1",
                              flags=KNOB_START),
           **{f"knob_beta{b:g}": dict(stage="softmax_dpo", start="sft", label=f"knob: beta={b:g}",
                                      flags={**KNOB_START, "beta": b}) for b in (0.1, 0.3, 3.0)},
           "knob_ref": dict(stage="softmax_dpo", start="sft", label="knob: reference model",
                            flags={**KNOB_START, "reference": True}),
           **{f"knob_k{k}": dict(stage="softmax_dpo", start="sft", label=f"knob: K={k}",
                                 flags={**KNOB_START, "num_negatives": k}) for k in (1, 3, 7)},
           **{f"knob_gamma{g:g}": dict(stage="softmax_dpo", start="sft", label=f"knob: fixed margin gamma0={g:g}",
                                       flags={**KNOB_START, "margin_mode": "user", "alpha": 0.0, "gamma0": g})
              for g in (0.5, 1.0, 3.0)},
           "knob_share": dict(stage="softmax_dpo", start="sft", label="knob: sharing (rho=0.7)",
                              flags={**KNOB_START, "share_negatives": True, "rho": 0.7}),
           "knob_napo": dict(stage="softmax_dpo", start="sft", label="NAPO defaults (knob study)",
                             flags={**{k: v for k, v in NAPO.items() if k not in TUNED["napo"]},  # NAPOConfig's
                                    "beta": KNOB_START["beta"], "learning_rate": KNOB_LR}),  # not the tuned ones
           "knob_sdpo_ref": dict(stage="softmax_dpo", start="sft", label="S-DPO K=3 with reference (knob study)",
                                 flags={**KNOB_START, "num_negatives": 3, "reference": True}),
           "knob_dpo": dict(stage="dpo", start="sft", label="DPO (knob study)", flags=dict(learning_rate=KNOB_LR, beta=1.0)),
       }.items()},
}

# The validation sweep (`python reproduce.py sweep`): per method family, the candidate settings tried on the
# validation split (never on test), each a copy of the family's method with these flags, chosen by SWEEP_RULE
# (select_sweep). The chosen values are copied into TUNED (above) by hand, with TUNED_SWEEP as their
# evidence, so the table stays the one home of the flags a run uses (a test compares the two).
SWEEP_RULE = ("the highest validation ranking HR@1 under `clean`; ties go to the smaller learning rate, then "
              "the smaller beta (the cautious choice: the least movement away from the SFT adapter)")
SWEEP_START = "sweep_start"  # the sweep's reference row: the SFT adapter itself on the validation rows
SWEEP = {
    "dpo": dict(method="dpo", grid=dict(learning_rate=[3e-5, 1e-4, 3e-4], beta=[0.1, 1.0])),
    "sdpo": dict(method="sdpo", grid=dict(learning_rate=[3e-5, 1e-4, 3e-4], beta=[0.1, 1.0])),
    "napo": dict(method="napo", grid=dict(learning_rate=[3e-5, 1e-4, 3e-4], beta=[0.1, 1.0])),
    "sft_cont": dict(method="sft_cont", grid=dict(learning_rate=[1e-4, 3e-4, 1e-3])),
}


def cli_value(v) -> str:
    """A flag's value as a command line writes it (floats as repr: 0.0001 -> 1e-04 stays exact)."""
    return str(v) if not isinstance(v, float) else repr(v)


def sweep_candidates(families=None) -> dict:
    """{candidate name: method spec} for the SWEEP families selected (--families a,b; default all): the
    family's method with each combination of its grid as flags, trained on the same rows as the method and
    evaluated by ranking on the validation split under `clean` (plan: eval_split, protocols)."""
    import itertools

    if families in (None, "", "all"):
        names = list(SWEEP)
    else:
        names = [str(f).strip() for f in (families.split(",") if isinstance(families, str) else families)]
        unknown = [f for f in names if f not in SWEEP]
        if unknown:
            raise DataError(f"--families: unknown {', '.join(unknown)} (choose from {', '.join(SWEEP)})")
    # the adapter every candidate starts from, evaluated the same way: the reference a candidate must beat
    out = {SWEEP_START: dict(stage="sft", evaluates="sft", family="start", sweep={}, group="sweep",
                             label="SFT adapter (every candidate's start; no further training)",
                             eval_split="val", protocols=(PROTOCOLS[0],), eval_flags=RANKING_ONLY)}
    for fam in names:
        spec, grid = METHODS[SWEEP[fam]["method"]], SWEEP[fam]["grid"]
        for values in itertools.product(*grid.values()):
            flags = dict(zip(grid, values))
            name = f"sweep_{fam}_" + "_".join(f"{k.replace('learning_rate', 'lr')}{cli_value(v)}"
                                               for k, v in flags.items())
            out[name] = {**spec, "flags": {**spec.get("flags", {}), **flags}, "family": fam, "sweep": flags,
                         "label": f"{spec['label']} " + ", ".join(f"{k}={v:g}" for k, v in flags.items()),
                         "group": "sweep", "eval_split": "val", "protocols": (PROTOCOLS[0],),
                         "eval_flags": RANKING_ONLY}
    return out


def select_sweep(rows: list[dict]) -> dict:
    """{family: the chosen row} by SWEEP_RULE; rows without a result are left out."""
    def rank(r):  # smaller is better: the highest HR@1, then the smaller learning rate, then the smaller beta
        return -r["val_hr1"], r["flags"].get("learning_rate", 0.0), r["flags"].get("beta", 0.0)

    chosen = {}
    for r in rows:
        if r["family"] != "start" and r.get("val_hr1") is not None and (
                r["family"] not in chosen or rank(r) < rank(chosen[r["family"]])):
            chosen[r["family"]] = r
    return chosen
