"""Stage plumbing shared by the training stages (sft.py, dpo.py, softmax_dpo.py): the training arguments, where
a stage starts (an adapter) and how a killed run resumes (a Trainer checkpoint), and saving the final adapter
whole with the run's record.

* `training_args`: the TrainingArguments keywords every stage uses (one pass over the rows, whose epochs
  data_interface lays out; a resumable checkpoint every save_steps; the precision of the machine:
  training_precision_kwargs).
* `resolve_start` / `check_trainer_checkpoint` / `check_start`: `--start_adapter` (the adapter a stage starts
  from) and `--resume_from_checkpoint` (a checkpoint-N of an interrupted run of the same stage), both checked
  against the base model before anything loads.
* `run_stage`: record the start, train, save `output_dir/final_checkpoint` (adapter, tokenizer, napo_run.json,
  napo_base.json) under a temporary name and rename it: a killed run leaves no final_checkpoint.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cache
import cli
import modeling
from errors import ModelError

# The options every stage takes (inference too), and those of every training stage, defined once with their help;
# a stage changes a default in its cli.entry(...) (e.g. sft's learning rate 1e-3, the preference stages' 1e-4).
COMMON = [
    cli.Opt("base_model", "tiny", str, "tiny (the embedded default), tiny-nocopy (without its copy head), "
            "smollm2-135m, or a local Hugging Face model folder; nothing is downloaded"),
    cli.Opt("dataset", "lastfm", str, "a dataset name under data/, or a folder laid out like data/lastfm"),
    cli.Opt("output_dir", "output", str, "where the stage writes its outputs"),
    cli.Opt("protocol", "clean", str, "the candidate protocol: clean (default), or sdpo (the published one; "
            "its candidates give the answer away)"),
    cli.Opt("seed", 0, int, "seeds the clean candidates, the prompt templates, and training"),
    cli.Opt("quantize", "auto", str, "auto (4-bit NF4 on CUDA for models that are not embedded), 4bit, none"),
]
TRAINING = COMMON + [
    cli.Opt("start_adapter", None, str, "the LoRA adapter this stage starts from (dpo, softmax_dpo: the SFT "
            "adapter, required; sft: continue training it, the SFT-continued control)"),
    cli.Opt("resume_from_checkpoint", None, str, "a checkpoint-N of an interrupted run of this stage to continue "
            "(True: the latest in --output_dir); saved with --save_steps"),
    cli.Opt("batch_size", 16, int, "per-device batch size (NAPO's sharing pool is the global batch)"),
    cli.Opt("gradient_accumulation_steps", 1, int, "optimizer step every N batches"),
    cli.Opt("learning_rate", 1e-4, float, "peak learning rate of the LoRA weights (the NAPO authors' 7B scripts: 1e-5)"),
    cli.Opt("num_train_epochs", 1, int, "epochs over the rows (clean: fresh candidates every epoch)"),
    cli.Opt("cutoff_len", 512, int, "max prompt+answer tokens; a longer row is an error, never truncated"),
    cli.Opt("max_train_samples", -1, int, "the first N train rows (-1: all 47,872 of LastFM)"),
    cli.Opt("warmup_ratio", 0.05, float, "share of the steps spent warming the learning rate up"),
    cli.Opt("lr_scheduler_type", "cosine", str, "the learning-rate schedule (transformers' SchedulerType)"),
    cli.Opt("max_grad_norm", 0.3, float, "gradient clipping"),
    cli.Opt("logging_steps", 10, int, "log every N optimizer steps (napo_run.json keeps the log)"),
    cli.Opt("save_steps", 0, int, "save a resumable checkpoint-N every N steps (0: only the final adapter)"),
    cli.Opt("max_steps", -1, int, "stop after N optimizer steps (-1: the whole run)"),
    cli.Opt("report_to", "none", str, "transformers' report_to (none, tensorboard, wandb, ...)"),
]


def training_precision_kwargs(info: dict | None = None) -> dict:
    """TRL configs default to bf16 + gradient checkpointing: right on CUDA (the authors' GPU setting), wrong
    on CPU (fp32 is faster there and bf16 raises). Paged AdamW (bitsandbytes) when the model is 4-bit on CUDA;
    on CPU, 4-bit or not, transformers' default AdamW (torch's fused one): bitsandbytes' paged optimizers are
    CUDA-only (on CPU they warn and fall back to a plain AdamW). The checkpointing flag is `activation_checkpointing` in transformers 5.24, `gradient_checkpointing`
    in older 5.x (the 5.17 of the GPU machines, gpu_check.sh)."""
    from transformers import TrainingArguments

    ckpt = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
            else "gradient_checkpointing")
    if modeling.use_cuda():
        kw = dict(bf16=True, **{ckpt: True})
        if info and info.get("quantized_4bit"):
            kw["optim"] = "paged_adamw_32bit"
        return kw
    # use_cpu: without it, accelerate sees LOCAL_RANK (torchrun) but no GPU and falls back to a
    # non-distributed state, so every process would train on all rows and save alone (no DDP, no gloo).
    return dict(bf16=False, dataloader_pin_memory=False, use_cpu=True, **{ckpt: False})


TRAINING_FLAGS = ("output_dir", "batch_size", "gradient_accumulation_steps", "learning_rate", "cutoff_len",
                  "lr_scheduler_type", "warmup_ratio", "max_grad_norm", "logging_steps", "save_steps", "report_to",
                  "seed", "max_steps")


def training_flags(options: dict) -> dict:
    """The keywords of training_args among a stage main()'s flags (its locals())."""
    return {k: options[k] for k in TRAINING_FLAGS if k in options}


def training_args(info, *, output_dir, batch_size, gradient_accumulation_steps, learning_rate, cutoff_len,
                  lr_scheduler_type, warmup_ratio, max_grad_norm, logging_steps, save_steps, report_to, seed,
                  max_steps=-1, **extra) -> dict:
    """The TrainingArguments keywords of every training stage (SFTConfig and DPOConfig take them; the stages'
    build_trainer and benchmark.py pass them): one pass over the rows, whose epochs data_interface has laid
    out already; a resumable checkpoint every save_steps optimizer steps (0: only the final adapter); the
    precision of training_precision_kwargs. `extra`: further keywords, passed on."""
    return dict(
        output_dir=output_dir, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=learning_rate, num_train_epochs=1,
        max_steps=max_steps, max_length=cutoff_len, lr_scheduler_type=lr_scheduler_type,
        # Not a slip: transformers 5 has no warmup_ratio; a float warmup_steps below 1 is the share of all
        # steps spent warming up (TrainingArguments.get_warmup_steps: ceil(total steps × warmup_steps)).
        warmup_steps=warmup_ratio,
        max_grad_norm=max_grad_norm, logging_steps=logging_steps, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, report_to=report_to, seed=seed, data_seed=seed,
        ddp_find_unused_parameters=False,  # every LoRA weight is used each step; True breaks checkpointing
        **training_precision_kwargs(info), **extra)


def base_record_callback(info: dict):
    """A TrainerCallback that writes the base-model record into every checkpoint-N the Trainer saves, so a
    checkpoint evaluated or resumed on another base model is refused like a final adapter."""
    from transformers import TrainerCallback

    record = modeling.base_record(info)

    class BaseRecord(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and ckpt.is_dir():
                modeling.write_base_record(ckpt, record)

    return BaseRecord()


def resolve_start(start_adapter, resume_from_checkpoint, output_dir) -> tuple[Path, str | None]:
    """(the adapter a preference stage starts from, the Trainer checkpoint it continues or None).
    `--start_adapter` names the SFT adapter to start from; `--resume_from_checkpoint` a `checkpoint-N` of an
    interrupted run of this stage (True: the latest in output_dir), whose starting adapter was recorded in
    output_dir/start.json (so --start_adapter may then be left out). The spelling of before, an adapter passed
    as --resume_from_checkpoint, still works, with a one-line deprecation warning."""
    ckpt = None
    if resume_from_checkpoint not in (None, "", False):
        r = resume_from_checkpoint
        if r is True or str(r) == "True":
            ckpt = _last_checkpoint(output_dir)
        elif (Path(r) / "trainer_state.json").exists():
            ckpt = str(r)
        elif (Path(r) / "adapter_config.json").exists():  # the old spelling: the adapter to start from
            if start_adapter not in (None, "") and Path(start_adapter).resolve() != Path(r).resolve():
                raise ModelError(f"--resume_from_checkpoint {r}: an adapter, not a Trainer checkpoint, and "
                                 f"--start_adapter {start_adapter} is given too; pass the adapter to start from as "
                                 "--start_adapter only")
            print(f"warning: --resume_from_checkpoint {r}: an adapter to start from is now --start_adapter "
                  "(--resume_from_checkpoint continues a checkpoint-N of an interrupted run)", file=sys.stderr,
                  flush=True)
            start_adapter = r
        else:
            raise ModelError(f"--resume_from_checkpoint {r}: not a Trainer checkpoint (a checkpoint-N folder with "
                             "trainer_state.json, saved with --save_steps); the adapter to start from is --start_adapter")
    if ckpt is not None:
        start_file = Path(ckpt).parent / "start.json"
        if not start_file.exists():
            raise ModelError(f"--resume_from_checkpoint {ckpt}: {start_file} is missing (where did this run start?)")
        try:
            recorded = json.loads(start_file.read_text())["start_adapter"]
        except (ValueError, KeyError, TypeError):
            raise ModelError(f"{start_file}: unreadable (not the JSON record of the adapter this run started "
                             "from); pass it again as --start_adapter and delete the file") from None
        if start_adapter in (None, ""):
            start_adapter = recorded
            return modeling.check_adapter(start_adapter, f"{start_file} start_adapter"), ckpt
        if Path(start_adapter).resolve() != Path(recorded).resolve():
            raise ModelError(f"--start_adapter {start_adapter}: the run of --resume_from_checkpoint {ckpt} started "
                             f"from {recorded} ({start_file}); continue it from there or start a new --output_dir")
    if start_adapter in (None, ""):
        raise ModelError("--start_adapter is required: the SFT adapter to start from (e.g. output/sft/final_checkpoint)")
    return modeling.check_adapter(start_adapter, "--start_adapter"), ckpt


def _last_checkpoint(output_dir) -> str:
    from transformers.trainer_utils import get_last_checkpoint

    ckpt = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if ckpt is None:
        raise ModelError(f"--resume_from_checkpoint True: no checkpoint-N folder in {output_dir}")
    return ckpt


def check_trainer_checkpoint(resume_from_checkpoint, output_dir, base=None) -> str:
    """A Trainer checkpoint (checkpoint-N with trainer_state.json; True: the latest in output_dir) to continue
    a run of the same stage, trained on `base` when given."""
    if resume_from_checkpoint is True or str(resume_from_checkpoint) == "True":
        ckpt = _last_checkpoint(output_dir)
    else:
        ckpt = str(resume_from_checkpoint)
        if not (Path(ckpt) / "trainer_state.json").exists():
            raise ModelError(f"--resume_from_checkpoint {ckpt}: not a Trainer checkpoint (a checkpoint-N folder "
                             "with trainer_state.json, saved with --save_steps; to train an adapter further: --start_adapter)")
    check_checkpoint_files(ckpt)
    modeling.check_adapter(ckpt, "--resume_from_checkpoint", base=base)
    return ckpt


def check_checkpoint_files(ckpt) -> None:
    """A checkpoint-N's files are whole, cheaply (nothing loaded): trainer_state.json and adapter_config.json JSON
    objects, the adapter's weights (safetensors header and size) and the optimizer, scheduler and RNG states
    (torch.save archives) readable to their end."""
    folder = Path(ckpt)
    weights = [p for p in folder.iterdir() if p.suffix in (".pt", ".pth") or p.name in modeling.ADAPTER_WEIGHTS]
    for f in [folder / "trainer_state.json", folder / "adapter_config.json", *sorted(weights)]:
        why = cache.json_problem(f) if f.suffix == ".json" else cache.weights_problem(f)
        if why:
            raise ModelError(f"--resume_from_checkpoint {ckpt}: {f} is {why}: a damaged checkpoint (a run killed while "
                             f"saving, or a full disk?); delete {folder.name} and resume from an earlier checkpoint-N "
                             "(--resume_from_checkpoint True takes the latest left), or start over without "
                             "--resume_from_checkpoint")


def check_start(base_model, dataset, start_adapter, ckpt=None, what="--start_adapter") -> Path:
    """Before a stage loads anything: the start adapter (if any) and, when the run resumes, its checkpoint-N
    whole (their files) and recorded on this --base_model's build (by name, before it is built); then the base
    model folder (built if need be) and both trained on it (by fingerprint). Returns the base model's folder."""
    if ckpt:
        check_checkpoint_files(ckpt)
    for adapter, flag in ((start_adapter, what), (ckpt, "--resume_from_checkpoint")):
        if adapter:
            modeling.check_adapter(adapter, flag)
            modeling.check_adapter_base_name(adapter, base_model, dataset, flag)
    base = modeling.resolve_base_model(base_model, dataset)
    if start_adapter:
        modeling.check_adapter(start_adapter, what, base=base)
    if ckpt:
        modeling.check_adapter(ckpt, "--resume_from_checkpoint", base=base)
    return base


def record_start(output_dir, start_adapter, is_main=True):
    if is_main:
        cache.atomic_write_text(Path(output_dir) / "start.json",
                             json.dumps({"start_adapter": str(Path(start_adapter).resolve())}))


def save_final(trainer, tokenizer, output_dir, run: dict) -> Path:
    """Save the trained adapter (only "default", not TRL's frozen "ref" copy), the tokenizer and
    napo_run.json (options + training log) to output_dir/final_checkpoint, on the main process only."""
    final = Path(output_dir) / "final_checkpoint"
    if trainer.is_world_process_zero():
        # a run killed while saving leaves no final_checkpoint (only final_checkpoint.tmp<PID>, removed later)
        def fill(tmp):
            model = trainer.model
            kwargs = {"selected_adapters": ["default"]} if "ref" in getattr(model, "peft_config", {}) else {}
            model.save_pretrained(tmp, **kwargs)
            tokenizer.save_pretrained(tmp)
            if isinstance(run.get("model"), dict) and "path" in run["model"]:
                modeling.write_base_record(tmp, modeling.base_record(run["model"]))
            cache.atomic_write_text(tmp / "napo_run.json",
                                 json.dumps({**run, "log_history": trainer.state.log_history}, indent=2))

        cache.write_folder(final, fill)
        print(f"saved adapter to {final}")
    return final


def run_stage(trainer, tokenizer, output_dir, start_adapter, ckpt, run: dict) -> Path:
    """The end of every training stage's main(): record the adapter it starts from (if any), train
    (continuing the Trainer checkpoint `ckpt` if given) and save the final adapter whole with the run's record."""
    if start_adapter:
        record_start(output_dir, start_adapter, trainer.is_world_process_zero())
    trainer.train(resume_from_checkpoint=ckpt)
    return save_final(trainer, tokenizer, output_dir, run)
