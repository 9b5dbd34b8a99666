"""Stage 1 — supervised fine-tuning (LoRA, loss on the answer only) with TRL's SFTTrainer.

    python sft.py --base_model tiny --dataset lastfm --output_dir output/sft --max_train_samples 4096

Each training row: prompt (history + 20 candidates, ending "Answer:") -> completion " <target title>" + EOS.
Under the `clean` protocol the candidates are re-drawn for every epoch (the epochs are laid out in the
dataset, so the trainer runs one pass over `num_train_epochs` copies). Saves adapter + tokenizer to
`output_dir/final_checkpoint`. `--start_adapter A` continues training adapter A instead of a new LoRA (the
"SFT continued" control beside the preference stages, at their budget).
"""
from __future__ import annotations

import cli
import data_interface as di
import modeling  # sets the offline environment first
import stage
import tokens

OPTIONS = [
    cli.Opt("eval_step", 0.0, float, "evaluate the loss on validation rows every N steps (or a fraction < 1 of the "
            "run); 0: never"),
    cli.Opt("max_eval_samples", 256, int, "validation rows for that loss"),
    cli.Opt("lora_r", 8, int, "LoRA rank (on q,k,v,o,gate,up,down); unused with --start_adapter"),
    cli.Opt("lora_alpha", 32, int, "LoRA alpha"),
    cli.Opt("lora_dropout", 0.1, float, "LoRA dropout"),
]


def tokenized_sft_dataset(tokenizer, rows, cutoff_len, what):
    """Pre-tokenize prompt/completion rows with the project's one tokenization (tokens.encode_prompt_answers)
    so SFT trains on exactly the tokens that preference training and ranking score."""
    from datasets import Dataset

    ids, masks = [], []
    for i, r in enumerate(rows):
        p, (a,) = tokens.encode_prompt_answers(tokenizer, r["prompt"], [r["completion"]])
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
    base-model record of each checkpoint). `options`: the keywords of stage.training_args."""
    from peft import PeftModel
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        per_device_eval_batch_size=options["batch_size"], completion_only_loss=True, remove_unused_columns=False,
        eval_strategy="steps" if evals is not None else "no", eval_steps=eval_step if evals is not None else None,
        **stage.training_args(info, **options))
    # a model that already carries its adapter (SFT continued from --start_adapter) gets no new LoRA
    peft = None if isinstance(model, PeftModel) else lora if lora is not None else modeling.lora_config()
    return SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tokenizer,
                      callbacks=callbacks, peft_config=peft)


@cli.entry(stage.TRAINING, OPTIONS, output_dir="output/sft", learning_rate=1e-3)
def main(o):
    """Stage 1 — SFT (LoRA, answer-only loss); writes OUTPUT_DIR/final_checkpoint."""
    from transformers import set_seed

    # every input is checked before a model is loaded or a file written: options (cli.entry), data rows, the
    # base model folder, the adapter to start from and the checkpoint to resume, trained on that base model
    catalog = di.load_catalog(o.dataset)
    train_rows = di.sft_rows(catalog, "train", o.protocol, o.seed, o.num_train_epochs, o.max_train_samples)
    do_eval = o.eval_step > 0 and o.max_eval_samples != 0
    eval_rows = di.sft_rows(catalog, "val", o.protocol, o.seed, 1, o.max_eval_samples) if do_eval else None
    ckpt = stage.check_trainer_checkpoint(o.resume_from_checkpoint, o.output_dir) if o.resume_from_checkpoint \
        else None
    stage.check_start(o.base_model, o.dataset, o.start_adapter, ckpt)  # the base built or loaded only after
    set_seed(o.seed)
    model, tokenizer, info = (modeling.load_policy(o.base_model, o.dataset, o.start_adapter, o.quantize)
                              if o.start_adapter else modeling.load_base_model(o.base_model, o.dataset, o.quantize))
    train = tokenized_sft_dataset(tokenizer, train_rows, o.cutoff_len, "train")
    evals = tokenized_sft_dataset(tokenizer, eval_rows, o.cutoff_len, "val") if do_eval else None
    trainer = build_trainer(  # the epochs are already laid out in `train` (fresh candidates each epoch)
        model, tokenizer, info, train, evals, o.eval_step, modeling.lora_config(o.lora_r, o.lora_alpha, o.lora_dropout),
        callbacks=[stage.base_record_callback(info)], **stage.training_flags(vars(o)))
    final = stage.run_stage(trainer, tokenizer, o.output_dir, o.start_adapter, ckpt, {
        "stage": "sft", "protocol": o.protocol, "dataset": catalog.name, "model": info,
        "start_adapter": str(o.start_adapter) if o.start_adapter else None,
        "train_rows": len(train), "epochs": o.num_train_epochs, "seed": o.seed})
    return str(final)


if __name__ == "__main__":
    cli.run(main)
