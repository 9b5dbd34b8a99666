"""Stage 2a — plain DPO with TRL's own DPOTrainer and its own sigmoid loss (the untouched-library baseline).

    python dpo.py --start_adapter output/sft/final_checkpoint --output_dir output/dpo

One negative per row, drawn (seeded) from the row's 19 non-target candidates. The policy starts from the
SFT adapter and keeps training it; the reference is the frozen SFT model (TRL copies the adapter as "ref").
"""
from __future__ import annotations

import cli
import modeling  # sets the offline environment first
import data_interface as di


def build_trainer(model, tokenizer, info, rows, beta=1.0, callbacks=None, **options):
    """This stage's trainer, as main() runs it and benchmark.py times it: TRL's DPOTrainer with its sigmoid loss
    on preference rows (each row's first rejected answer) and, as reference, TRL's frozen copy of the policy's
    adapter; the TrainerCallbacks `callbacks`. `options`: the keywords of modeling.training_args."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    train = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "chosen": [r["chosen"] for r in rows],
                               "rejected": [r["rejected"][0] for r in rows]})
    args = DPOConfig(beta=beta, loss_type="sigmoid", **modeling.training_args(info, **options))
    return DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=callbacks)


@cli.validated
def main(
    base_model: str = "tiny",
    dataset: str = "lastfm",
    start_adapter: str = None,           # the SFT adapter to start from (e.g. output/sft/final_checkpoint)
    resume_from_checkpoint: str = None,  # a checkpoint-N of an interrupted run of this stage to continue (True: the latest)
    output_dir: str = "output/dpo",
    protocol: str = "clean",
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    learning_rate: float = 1e-4,         # the NAPO authors' 7B scripts use 1e-5
    num_train_epochs: int = 1,
    beta: float = 1.0,
    cutoff_len: int = 512,
    max_train_samples: int = -1,
    seed: int = 0,
    report_to: str = "none",
    warmup_ratio: float = 0.05,
    lr_scheduler_type: str = "cosine",
    max_grad_norm: float = 0.3,
    logging_steps: int = 10,
    save_steps: int = 0,
    quantize: str = "auto",
):
    from transformers import set_seed

    start, ckpt = modeling.resolve_start(start_adapter, resume_from_checkpoint, output_dir)
    catalog = di.load_catalog(dataset)
    rows = di.preference_rows(catalog, "train", protocol, 1, seed, num_train_epochs, max_train_samples)
    modeling.check_start(base_model, dataset, start, ckpt)  # the SFT adapter was trained on this base model
    flags = modeling.training_flags(locals())
    set_seed(seed)
    model, tokenizer, info = modeling.load_policy(base_model, dataset, start, quantize)
    trainer = build_trainer(model, tokenizer, info, rows, beta, callbacks=[modeling.base_record_callback(info)], **flags)
    modeling.run_stage(trainer, tokenizer, output_dir, start, ckpt, {
        "stage": "dpo", "protocol": protocol, "dataset": catalog.name, "model": info, "beta": beta,
        "start_adapter": str(start), "train_rows": len(rows), "epochs": num_train_epochs, "seed": seed})

if __name__ == "__main__":
    cli.run(main)
