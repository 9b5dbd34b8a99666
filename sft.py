"""Stage 1 — supervised fine-tuning (LoRA, loss on the answer only) with TRL's SFTTrainer.

    python sft.py --base_model tiny --dataset lastfm --output_dir output/sft --max_train_samples 4096

Each training row: prompt (history + 20 candidates, ending "Answer:") -> completion " <target title>" + EOS.
Under the `clean` protocol the candidates are re-drawn for every epoch (the epochs are laid out in the
dataset, so the trainer runs one pass over `num_train_epochs` copies). Saves adapter + tokenizer to
`output_dir/final_checkpoint`.
"""
from __future__ import annotations

import cli
import modeling  # sets the offline environment first
import data_interface as di


def tokenized_sft_dataset(tokenizer, rows, cutoff_len, what):
    """Pre-tokenize prompt/completion rows with the project's one tokenization (modeling.encode_prompt_answers)
    so SFT trains on exactly the tokens that preference training and ranking score."""
    from datasets import Dataset

    ids, masks = [], []
    for i, r in enumerate(rows):
        p, (a,) = modeling.encode_prompt_answers(tokenizer, r["prompt"], [r["completion"]])
        if len(p) + len(a) > cutoff_len:
            raise di.DataError(f"{what} row {i}: prompt+answer is {len(p) + len(a)} tokens, over --cutoff_len "
                               f"{cutoff_len} (raise --cutoff_len; rows are never truncated)")
        ids.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    return Dataset.from_dict({"input_ids": ids, "completion_mask": masks})


def build_trainer(model, tokenizer, info, train, evals=None, eval_step=0.0, lora=None, callbacks=None,
                  **options):
    """This stage's SFTTrainer, as main() runs it and benchmark.py times it: loss on the answer tokens of rows
    made by tokenized_sft_dataset, the LoRA `lora` (default modeling.lora_config()) put on by the trainer, an
    evaluation every `eval_step` steps when `evals` is given, the TrainerCallbacks `callbacks` (main: the
    base-model record of each checkpoint). `options`: the keywords of modeling.training_args."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        per_device_eval_batch_size=options["batch_size"], completion_only_loss=True, remove_unused_columns=False,
        eval_strategy="steps" if evals is not None else "no", eval_steps=eval_step if evals is not None else None,
        **modeling.training_args(info, **options))
    # a model that already carries its adapter (SFT continued from --start_adapter) gets no new LoRA
    from peft import PeftModel

    peft = None if isinstance(model, PeftModel) else lora if lora is not None else modeling.lora_config()
    return SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tokenizer,
                      callbacks=callbacks, peft_config=peft)


@cli.validated
def main(
    base_model: str = "tiny",            # 'tiny' (embedded default), 'smollm2-135m', or a local HF model folder
    dataset: str = "lastfm",             # dataset name under data/ or a dataset folder
    output_dir: str = "output/sft",
    protocol: str = "clean",             # candidate protocol: 'clean' (default) or 'sdpo' (published, leaks)
    batch_size: int = 16,                # per-device batch size
    gradient_accumulation_steps: int = 1,
    learning_rate: float = 1e-3,         # LoRA lr; the NAPO authors' 7B scripts use 1e-5
    num_train_epochs: int = 1,
    cutoff_len: int = 512,               # max prompt+answer tokens; longer rows are an error, never truncated
    eval_step: float = 0.0,              # evaluate every N steps (or a fraction <1 of the run); 0 = never
    max_train_samples: int = -1,         # first N train rows (-1 = all 47,872)
    max_eval_samples: int = 256,         # validation rows for eval loss
    seed: int = 0,
    report_to: str = "none",
    resume_from_checkpoint: str = None,  # a Trainer checkpoint of this run (checkpoint-N) to continue
    start_adapter: str = None,           # continue training this adapter (e.g. output/sft/final_checkpoint): the
                                         # "SFT continued" control beside the preference stages; LoRA options unused
    warmup_ratio: float = 0.05,
    lr_scheduler_type: str = "cosine",
    max_grad_norm: float = 0.3,
    logging_steps: int = 10,
    save_steps: int = 0,                 # save a resumable checkpoint every N steps (0 = only at the end)
    lora_r: int = 8,
    lora_alpha: int = 32,
    lora_dropout: float = 0.1,
    quantize: str = "auto",              # 'auto' (4-bit NF4 on CUDA for non-embedded models), '4bit', 'none'
):
    from transformers import set_seed

    # every input is checked before a model is loaded or a file written: options (cli.validated), data rows,
    # the base model folder, the checkpoint to resume and the base model it was trained on
    catalog = di.load_catalog(dataset)
    train_rows = di.sft_rows(catalog, "train", protocol, seed, num_train_epochs, max_train_samples)
    do_eval = eval_step > 0 and max_eval_samples != 0
    eval_rows = di.sft_rows(catalog, "val", protocol, seed, 1, max_eval_samples) if do_eval else None
    if start_adapter:  # the adapter must have been trained on this base model
        base = modeling.check_start(base_model, dataset, start_adapter, what="--start_adapter")
    else:
        base = modeling.resolve_base_model(base_model, dataset)
    if resume_from_checkpoint:
        resume_from_checkpoint = modeling.check_trainer_checkpoint(resume_from_checkpoint, output_dir, base)
    set_seed(seed)
    model, tokenizer, info = (modeling.load_policy(base_model, dataset, start_adapter, quantize) if start_adapter
                              else modeling.load_base_model(base_model, dataset, quantize=quantize))
    train = tokenized_sft_dataset(tokenizer, train_rows, cutoff_len, "train")
    evals = tokenized_sft_dataset(tokenizer, eval_rows, cutoff_len, "val") if do_eval else None
    trainer = build_trainer(  # the epochs are already laid out in `train` (fresh candidates each epoch)
        model, tokenizer, info, train, evals, eval_step, modeling.lora_config(lora_r, lora_alpha, lora_dropout),
        callbacks=[modeling.base_record_callback(info)], **modeling.training_flags(locals()))
    final = modeling.run_stage(trainer, tokenizer, output_dir, start_adapter, resume_from_checkpoint, {
        "stage": "sft", "protocol": protocol, "dataset": catalog.name, "model": info,
        "start_adapter": str(start_adapter) if start_adapter else None,
        "train_rows": len(train), "epochs": num_train_epochs, "seed": seed})
    return str(final)

if __name__ == "__main__":
    cli.run(main)
