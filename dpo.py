"""Stage 2a — plain DPO with TRL's own DPOTrainer and its own sigmoid loss (the untouched-library baseline).

    python dpo.py --resume_from_checkpoint output/sft/final_checkpoint --output_dir output/dpo

One negative per row, drawn (seeded) from the row's 19 non-target candidates. The policy starts from the
SFT adapter and keeps training it; the reference is the frozen SFT model (TRL copies the adapter as "ref").
"""
from __future__ import annotations

import sys

import modeling  # sets the offline environment first
import data_interface as di


def main(
    base_model: str = "tiny",
    dataset: str = "lastfm",
    resume_from_checkpoint: str = None,  # the SFT adapter to start from, or a checkpoint-N of this run to continue
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
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    set_seed(seed)
    di.check_protocol(protocol)
    start, ckpt = modeling.resolve_start(resume_from_checkpoint, output_dir)
    catalog = di.load_catalog(dataset)
    rows = di.preference_rows(catalog, "train", protocol, 1, seed, num_train_epochs, max_train_samples)
    train = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "chosen": [r["chosen"] for r in rows],
                               "rejected": [r["rejected"][0] for r in rows]})
    model, tokenizer, info = modeling.load_policy(base_model, dataset, start, quantize)
    args = DPOConfig(
        output_dir=output_dir, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=learning_rate,
        num_train_epochs=1, beta=beta, loss_type="sigmoid", max_length=cutoff_len,
        lr_scheduler_type=lr_scheduler_type, warmup_steps=warmup_ratio, max_grad_norm=max_grad_norm,
        logging_steps=logging_steps, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to=report_to, seed=seed, data_seed=seed,
        ddp_find_unused_parameters=False,  # every LoRA weight is used each step; True breaks checkpointing
        **modeling.training_precision_kwargs(info))
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    modeling.record_start(output_dir, start, trainer.is_world_process_zero())
    trainer.train(resume_from_checkpoint=ckpt)
    modeling.save_final(trainer, tokenizer, output_dir, {
        "stage": "dpo", "protocol": protocol, "dataset": catalog.name, "model": info, "beta": beta,
        "start_adapter": str(start), "train_rows": len(train), "epochs": num_train_epochs, "seed": seed})

if __name__ == "__main__":
    import fire

    try:
        fire.Fire(main, serialize=lambda _: None)
    except (di.DataError, modeling.ModelError) as e:
        sys.exit(f"error: {e}")
    finally:
        modeling.end_distributed()
