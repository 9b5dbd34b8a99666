"""Stage 2b — S-DPO and NAPO (NAPO by default, with the NAPO authors' values: K=3, rho=0.7, gamma0=1, alpha=0.3,
momentum=0.9, beta=1, reference-free; written once, in napo_config.NAPOConfig).

    python softmax_dpo.py --start_adapter output/sft/final_checkpoint --output_dir output/napo

Flags switch NAPO's pieces off:
    --share_negatives False --margin_mode none --reference True     plain S-DPO (K negatives, softmax loss)
    --num_negatives 1 --share_negatives False --margin_mode none --reference True    = DPO
    --margin_mode authors      the NAPO authors' code as it is (detached own negatives, M̄ from 0, ...: docs/method.md)
The SASRec behind sharing and the margin is trained once per dataset and cached (or --sasrec_checkpoint).
Sharing works within one forward's global batch: per-device batch x processes (gradient accumulation
does not enlarge it).
"""
from __future__ import annotations

from dataclasses import asdict

import cli
import data_interface as di
import modeling  # sets the offline environment first
import stage
from napo_config import NAPOConfig

OPTIONS = cli.opts_of(NAPOConfig) + [
    cli.Opt("precompute_ref_log_probs", False, bool, "with --reference True: score the reference once before "
            "training (TRL's precompute_ref_log_probs)"),
    cli.Opt("sasrec_checkpoint", None, str, "the SASRec folder behind sharing and the margin (default: trained "
            "once per dataset and cached)"),
]


def build_trainer(model, tokenizer, info, rows, napo, sasrec=None, precompute_ref_log_probs=False, callbacks=None,
                  **options):
    """This stage's trainer, as main() runs it and benchmark.py times it: NAPOTrainer (napo_trainer.py) with the
    options `napo` (a NAPOConfig) and the frozen `sasrec` (its padding id pads the histories) on preference rows
    with K rejected answers; the TrainerCallbacks `callbacks`. `options`: the keywords of stage.training_args."""
    from datasets import Dataset
    from trl import DPOConfig

    from napo_trainer import NAPOTrainer

    args = DPOConfig(precompute_ref_log_probs=precompute_ref_log_probs, **stage.training_args(info, **options))
    return NAPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                       napo=napo, sasrec=sasrec, callbacks=callbacks)


def frozen_sasrec(catalog, dataset, sasrec_checkpoint=None):
    """The SASRec behind sharing and the margin: the given folder, or the dataset's cached one (trained on first
    use; under torchrun the first process trains and caches it, the others wait and load it)."""
    import sasrec as sr

    return sr.load_sasrec(sasrec_checkpoint, catalog) if sasrec_checkpoint else sr.get_or_train_sasrec(dataset)


@cli.entry(stage.TRAINING, OPTIONS, output_dir="output/napo")
def main(o):
    """Stage 2b — S-DPO / NAPO (NAPOTrainer) from the SFT adapter; writes OUTPUT_DIR/final_checkpoint."""
    from transformers import set_seed

    napo = NAPOConfig.from_options(vars(o))  # this call's NAPO flags (already checked by cli.entry)
    if o.precompute_ref_log_probs and not o.reference:
        raise cli.OptionError("--precompute_ref_log_probs True needs --reference True")
    start, ckpt = stage.resolve_start(o.start_adapter, o.resume_from_checkpoint, o.output_dir)
    catalog = di.load_catalog(o.dataset)
    rows = di.preference_rows(catalog, "train", o.protocol, o.num_negatives, o.seed, o.num_train_epochs,
                              o.max_train_samples)
    stage.check_start(o.base_model, o.dataset, start, ckpt)  # the SFT adapter was trained on this base model
    sasrec = frozen_sasrec(catalog, o.dataset, o.sasrec_checkpoint) if napo.needs_sasrec else None
    set_seed(o.seed)
    model, tokenizer, info = modeling.load_policy(o.base_model, o.dataset, start, o.quantize)
    trainer = build_trainer(model, tokenizer, info, rows, napo, sasrec, o.precompute_ref_log_probs,
                            callbacks=[stage.base_record_callback(info)], **stage.training_flags(vars(o)))
    stage.run_stage(trainer, tokenizer, o.output_dir, start, ckpt, {
        "stage": "napo" if napo.needs_sasrec else "sdpo", "protocol": o.protocol, "dataset": catalog.name,
        "model": info, "napo": asdict(napo), "start_adapter": str(start), "train_rows": len(rows),
        "epochs": o.num_train_epochs, "seed": o.seed, "M_bar": trainer.M_bar})


if __name__ == "__main__":
    cli.run(main)
