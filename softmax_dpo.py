"""Stage 2b — S-DPO and NAPO (NAPO by default, with the NAPO authors' values:
K=3, rho=0.7, gamma0=1, alpha=0.3, momentum=0.9, beta=1, reference-free; written once, in napo_config.NAPOConfig).

    python softmax_dpo.py --start_adapter output/sft/final_checkpoint --output_dir output/napo

Flags switch NAPO's pieces off:
    --share_negatives False --margin_mode none --reference True     plain S-DPO (K negatives, softmax loss)
    --num_negatives 1 --share_negatives False --margin_mode none --reference True    = DPO
    --margin_mode authors      the NAPO authors' code as it is (detached own negatives, M̄ from 0, ...: README)
The SASRec behind sharing and the margin is trained once per dataset and cached (or --sasrec_checkpoint).
Sharing works within one forward's global batch: per-device batch x processes (gradient accumulation
does not enlarge it).
"""
from __future__ import annotations

from dataclasses import asdict

import cli
import modeling  # sets the offline environment first
import data_interface as di
from napo_config import DEFAULTS as NAPO, NAPOConfig


def build_trainer(model, tokenizer, info, rows, napo, sasrec=None, precompute_ref_log_probs=False, callbacks=None,
                  **options):
    """This stage's trainer, as main() runs it and benchmark.py times it: NAPOTrainer (napo_trainer.py) with the
    options `napo` (a NAPOConfig) and the frozen `sasrec` (its padding id pads the histories) on preference rows
    with K rejected answers; the TrainerCallbacks `callbacks`. `options`: the keywords of modeling.training_args."""
    from datasets import Dataset
    from trl import DPOConfig

    from napo_trainer import NAPOTrainer

    args = DPOConfig(precompute_ref_log_probs=precompute_ref_log_probs, **modeling.training_args(info, **options))
    return NAPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                       napo=napo, sasrec=sasrec, callbacks=callbacks)


@cli.validated
def main(
    base_model: str = "tiny",
    dataset: str = "lastfm",
    start_adapter: str = None,           # the SFT adapter to start from (e.g. output/sft/final_checkpoint)
    resume_from_checkpoint: str = None,  # a checkpoint-N of an interrupted run of this stage to continue (True: the latest)
    output_dir: str = "output/napo",
    protocol: str = "clean",
    batch_size: int = 16,                # per-device batch; the sharing pool is the global batch
    gradient_accumulation_steps: int = 1,
    learning_rate: float = 1e-4,         # the NAPO authors' 7B scripts use 1e-5
    num_train_epochs: int = 1,
    # NAPO's options: their defaults are NAPOConfig's (napo_config.py), so they are written there only
    beta: float = NAPO.beta,
    num_negatives: int = NAPO.num_negatives,  # K (1..19)
    share_negatives: bool = NAPO.share_negatives,
    rho: float = NAPO.rho,
    margin_mode: str = NAPO.margin_mode,       # user | batch | authors | none
    gamma0: float = NAPO.gamma0,
    alpha: float = NAPO.alpha,
    momentum: float = NAPO.momentum,
    clamp_margin: bool = NAPO.clamp_margin,
    reference: bool = NAPO.reference,          # False: reference-free rewards (authors' NAPO); True: S-DPO style
    precompute_ref_log_probs: bool = False,
    shared_scoring: bool = NAPO.shared_scoring,  # encode each prompt once (False: naive concatenation, for checks)
    sasrec_checkpoint: str = None,       # a sasrec folder; default: train once per dataset and cache
    cutoff_len: int = 512,
    max_train_samples: int = -1,
    seed: int = 0,
    report_to: str = "none",
    warmup_ratio: float = 0.05,
    lr_scheduler_type: str = "cosine",
    max_grad_norm: float = 0.3,
    logging_steps: int = 10,
    save_steps: int = 0,
    max_steps: int = -1,                 # stop after N optimizer steps (-1 = the whole run)
    quantize: str = "auto",
):
    napo = NAPOConfig.from_options(locals())  # this call's NAPO flags (already checked by cli.validated)
    from transformers import set_seed

    if precompute_ref_log_probs and not reference:
        raise cli.OptionError("--precompute_ref_log_probs True needs --reference True")
    start, ckpt = modeling.resolve_start(start_adapter, resume_from_checkpoint, output_dir)
    catalog = di.load_catalog(dataset)
    rows = di.preference_rows(catalog, "train", protocol, num_negatives, seed, num_train_epochs, max_train_samples)
    modeling.check_start(base_model, dataset, start, ckpt)  # the SFT adapter was trained on this base model
    flags = modeling.training_flags(locals())
    sasrec = None
    if napo.needs_sasrec:
        import sasrec as sr

        if sasrec_checkpoint:
            sasrec = sr.load_sasrec(sasrec_checkpoint, catalog)
        else:  # under torchrun the first process trains and caches it, the others wait on the lock and load it
            with modeling._file_lock(sr.cache_root() / "sasrec" / f"{catalog.name}.lock"):
                sasrec = sr.get_or_train_sasrec(dataset)
    set_seed(seed)
    model, tokenizer, info = modeling.load_policy(base_model, dataset, start, quantize)
    trainer = build_trainer(model, tokenizer, info, rows, napo, sasrec, precompute_ref_log_probs,
                            callbacks=[modeling.base_record_callback(info)], **flags)
    modeling.run_stage(trainer, tokenizer, output_dir, start, ckpt, {
        "stage": "napo" if napo.needs_sasrec else "sdpo", "protocol": protocol, "dataset": catalog.name,
        "model": info, "napo": asdict(napo), "start_adapter": str(start), "train_rows": len(rows),
        "epochs": num_train_epochs, "seed": seed, "M_bar": trainer.M_bar})

if __name__ == "__main__":
    cli.run(main)
