"""Stage 2a — plain DPO with TRL's own DPOTrainer and its own sigmoid loss (the untouched-library baseline).

    python dpo.py --start_adapter output/sft/final_checkpoint --output_dir output/dpo

One negative per row, drawn (seeded) from the row's 19 non-target candidates. The policy starts from the
SFT adapter and keeps training it; the reference is the frozen SFT model (TRL copies the adapter as "ref").
"""
from __future__ import annotations

import cli
import data_interface as di
import modeling  # sets the offline environment first
import stage

OPTIONS = [cli.Opt("beta", 1.0, float, "beta of DPO's sigmoid loss -log sigmoid(beta * (ratio(p) - ratio(d)))")]


def build_trainer(model, tokenizer, info, rows, beta=1.0, callbacks=None, **options):
    """This stage's trainer, as main() runs it and benchmark.py times it: TRL's DPOTrainer with its sigmoid loss
    on preference rows (each row's first rejected answer) and, as reference, TRL's frozen copy of the policy's
    adapter; the TrainerCallbacks `callbacks`. `options`: the keywords of stage.training_args."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    train = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "chosen": [r["chosen"] for r in rows],
                               "rejected": [r["rejected"][0] for r in rows]})
    args = DPOConfig(beta=beta, loss_type="sigmoid", **stage.training_args(info, **options))
    return DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=callbacks)


@cli.entry(stage.TRAINING, OPTIONS, output_dir="output/dpo", batch_size=8)
def main(o):
    """Stage 2a — DPO (TRL's DPOTrainer, 1 negative) from the SFT adapter; writes OUTPUT_DIR/final_checkpoint."""
    from transformers import set_seed

    start, ckpt = stage.resolve_start(o.start_adapter, o.resume_from_checkpoint, o.output_dir)
    catalog = di.load_catalog(o.dataset)
    rows = di.preference_rows(catalog, "train", o.protocol, 1, o.seed, o.num_train_epochs, o.max_train_samples)
    stage.check_start(o.base_model, o.dataset, start, ckpt)  # the SFT adapter was trained on this base model
    set_seed(o.seed)
    model, tokenizer, info = modeling.load_policy(o.base_model, o.dataset, start, o.quantize)
    trainer = build_trainer(model, tokenizer, info, rows, o.beta, callbacks=[stage.base_record_callback(info)],
                            **stage.training_flags(vars(o)))
    stage.run_stage(trainer, tokenizer, o.output_dir, start, ckpt, {
        "stage": "dpo", "protocol": o.protocol, "dataset": catalog.name, "model": info, "beta": o.beta,
        "start_adapter": str(start), "train_rows": len(rows), "epochs": o.num_train_epochs, "seed": o.seed})


if __name__ == "__main__":
    cli.run(main)
