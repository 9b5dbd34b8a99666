"""Memory each training stage needs for 4-bit QLoRA as this project runs it: an estimate, not a measurement.

From a Hugging Face Llama `config.json` (`--config`) or a preset (`--model llama2-7b`, `smollm2-135m`) it prints a
markdown table, one row per stage x gradient checkpointing on/off: weights, LoRA + optimizer, activations and
their total, in GiB (`--json`: the same in bytes, with every input and the per-layer terms). Pure Python: it reads
JSON and imports neither torch nor transformers.

    python memory_estimate.py --model llama2-7b --batch 4 --prompt_tokens 200 --answer_tokens 6
    python memory_estimate.py --config /models/Llama-2-7b-hf/config.json --json
    python memory_estimate.py --model smollm2-135m --batch 2 --prompt_tokens 120 --answer_tokens 5 \
        --compute_dtype fp32 --device cpu          # the CPU setting (fp32 compute)

Weights. Every q,k,v,o,gate,up,down matrix in NF4: 4 bits a parameter plus, with double quantization (blocksize
64), an 8-bit absmax per 64 weights and an fp32 second-level absmax per 256 blocks: 4 + 8/64 + 32/(64*256)
= 4.127 bits a parameter. bitsandbytes leaves the embeddings, lm_head (none when tied) and the RMSNorm weights in
the load dtype (bf16), but the training stages call `peft.prepare_model_for_kbit_training`, which casts them to
fp32 (measured); inference does not (compute dtype).

LoRA + optimizer. r=8 on the 7 matrices of every layer: r*(in + out) parameters each, fp32 master weights (4 B),
fp32 gradients (4 B) and AdamW's two fp32 states (8 B): 16 B a parameter (inference: the 4 B weights only).
`--lora_dtype bf16`: what TRL 1.16's SFTTrainer/DPOTrainer do to a quantized model's trainable parameters (they
cast them to bf16, measured: the AdamW states and the saved adapter are bf16 too): 8 B a parameter.

Activations: the bytes autograd saves for backward, per decoder layer and token, with T = rows x seq tokens:
    2h*e                 the two RMSNorm inputs (the residual stream), e = its dtype
  + (6h + I)*(m + l)     LoRA dropout masks (m) and the dropped inputs saved by lora_A (l) of q,k,v (h each, the
                         dropout of every target is separate), o (h), gate, up (h each), down (I)
  + 7r*l                 lora_A outputs saved by lora_B
  + 4h*d + 4a            sdpa: q, k, v (k, v repeated to all a heads: transformers does so whenever an attention
                         mask is passed, which every stage here does), its output, the fp32 logsumexp
  + s*d                  the attention mask sdpa receives in each layer (rows*s^2*d per layer)
  + 3I*e                 SwiGLU: gate and up outputs (bitsandbytes returns its input's dtype) and silu(gate)
  + 8                    the fp32 rsqrt of the two norms
  (eager attention instead of sdpa: q, k, v (3h*d) plus the fp32 softmax output and, in bf16, its bf16 copy:
  a*s*(4 + d) a token, in place of 4h*d + 4a + s*d)
  d = compute dtype (bf16 on CUDA: autocast, so also a d-copy of each layer's fp32 LoRA weights), l = the smaller
  of d and the LoRA dtype (peft casts the input to the LoRA dtype, autocast to d), e = fp32 in training (the fp32
  norms and embeddings of prepare_model_for_kbit_training keep the residual stream fp32), m = 1 on CUDA (a bool
  mask) and the LoRA dtype's bytes on CPU (torch's CPU dropout saves a float noise tensor).
  Checked on a CPU against the tensors torch saved (SmolLM2-135M, NF4 + LoRA, 2 rows of 129 tokens, fp32 and bf16
  autocast): within 1%; and against the peak anonymous RSS of 3 training steps with glibc's large allocations
  mmapped (MALLOC_MMAP_THRESHOLD_=65536; its default malloc keeps ~0.45 GB more): activations + LoRA gradients
  + AdamW states 578 MiB measured, 570 estimated (checkpointing on: 72.5 vs 66.4). No GPU has measured the bf16
  CUDA figures; they follow the same code paths (bitsandbytes, peft, autocast; the bool dropout mask of CUDA).
  For reference, Korthikanti et al. (GPT, 4h MLP, bf16, no LoRA) count 34*h + 5*a*s bytes a token per layer;
  Llama-2-7B in this setting is ~75*h, most of it the fp32 SwiGLU intermediates and the LoRA dropout copies.
Without checkpointing: all L layers. With (HF's per-layer checkpointing): one input (T*h*e) per layer plus one
layer's full activations, recomputed during its backward. Plus the final norm's input (T*h*e) and the logits:
n*V*(d + 4) (the logits and their fp32 log-softmax), n the projected positions: this project's scoring and
TRL's fused LM head project only the answer positions (n = rows x answer tokens; `--full_logits`: every
position, as with transformers < 5.24), plus a d-copy of the fp32 lm_head under autocast.
A no-grad forward (DPO's reference, which TRL runs while the policy's activations are alive; inference) holds
one layer's working set, T*(2h + 4I)*e (+ the eager scores), and its logits.

Stages (b = per-device batch, P prompt, R answer tokens, K negatives, C candidates):
  SFT             b rows of P + R (answer-only loss)
  DPO             2b rows of P + R (TRL: chosen + rejected) + a reference forward without grad
  NAPO shared     b rows of P + (1+K)R (scoring.py: each prompt encoded once, its answers packed after it)
  NAPO naive      b(1+K) rows of P + R
  inference       b rows of P + C*R (ranking the C candidates, shared), no grad
Not counted: the CUDA context and allocator slack (~0.5-1 GiB on a GPU), the framework itself (~0.5 GB of RSS
on a CPU), NAPO's frozen SASRec (small), gradient buffers of the activations during backward.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

GIB = 2 ** 30
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes + 8-bit absmax per block of 64 + fp32 absmax per 256 blocks
NF4_BITS_NO_DQ = 4 + 32 / 64  # without double quantization: an fp32 absmax per block of 64
LORA_TARGETS = 7  # q, k, v, o, gate, up, down


@dataclass(frozen=True)
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False
    head_dim: int = 0  # 0: hidden // heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads


PRESETS = {
    "llama2-7b": Arch(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000),
    "smollm2-135m": Arch(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True),
}


class EstimateError(Exception):
    """A bad option or config file; printed as one `error:` line."""


def arch_from_config(cfg: dict, where: str = "config") -> Arch:
    """The Llama shape from a Hugging Face config.json dict."""
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in need if not isinstance(cfg.get(k), int) or cfg.get(k) < 1]
    if missing:
        raise EstimateError(f"{where}: missing or non-positive {', '.join(missing)} (not a Llama-style config?)")
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    if heads % kv:
        raise EstimateError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    return Arch(hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=heads, kv_heads=kv,
                intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                tied=bool(cfg.get("tie_word_embeddings", False)), head_dim=int(cfg.get("head_dim") or 0))


def load_arch(model: str | None = None, config: str | None = None) -> Arch:
    if config is not None:
        try:
            with open(config, encoding="utf-8") as f:
                cfg = json.load(f)
        except OSError as e:
            raise EstimateError(f"--config {config}: cannot read it ({e.strerror})") from None
        except ValueError as e:
            raise EstimateError(f"--config {config}: not JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise EstimateError(f"--config {config}: not a JSON object")
        return arch_from_config(cfg, f"--config {config}")
    return PRESETS[model or "llama2-7b"]


def linear_shapes(a: Arch) -> list[tuple[int, int]]:
    """(in, out) of the 7 LoRA-targeted matrices of one layer."""
    q, kv = a.heads * a.hd, a.kv_heads * a.hd
    h, i = a.hidden, a.intermediate
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def param_counts(a: Arch) -> dict:
    """Parameters by kind: the quantized linear layers, embeddings, lm_head (0 when tied), RMSNorm weights."""
    linear = a.layers * sum(i * o for i, o in linear_shapes(a))
    emb = a.vocab * a.hidden
    counts = {"linear": linear, "embedding": emb, "lm_head": 0 if a.tied else emb,
              "norms": (2 * a.layers + 1) * a.hidden}
    counts["total"] = sum(counts.values())
    return counts


def lora_params(a: Arch, r: int = 8) -> int:
    return a.layers * sum(r * (i + o) for i, o in linear_shapes(a))


def weight_bytes(a: Arch, other_bytes: int = 2, double_quant: bool = True) -> float:
    """NF4 linear layers + embeddings/lm_head/norms in `other_bytes` (2: bf16, 4: fp32)."""
    c = param_counts(a)
    bits = NF4_BITS if double_quant else NF4_BITS_NO_DQ
    return c["linear"] * bits / 8 + (c["embedding"] + c["lm_head"] + c["norms"]) * other_bytes


@dataclass(frozen=True)
class Setting:
    compute: int = 2  # d: compute dtype bytes
    residual: int = 4  # e: residual stream / 4-bit layer outputs
    mask: int = 1  # m: dropout mask bytes
    attention: str = "sdpa"
    lora_r: int = 8
    full_logits: bool = False
    lora: int = 4  # LoRA parameter dtype bytes


def layer_terms(a: Arch, rows: int, seq: int, st: Setting) -> dict:
    """Saved bytes of one decoder layer for `rows` sequences of `seq` tokens, by term (module docstring)."""
    t = rows * seq
    h, i, q, d, e, m = a.hidden, a.intermediate, a.heads * a.hd, st.compute, st.residual, st.mask
    lo = min(d, st.lora)
    terms = {"norm_inputs": 2 * h * e * t, "lora_dropout_masks": (6 * h + i) * m * t,
             "lora_inputs": (6 * h + i) * lo * t, "lora_mid": LORA_TARGETS * st.lora_r * lo * t,
             "mlp": 3 * i * e * t, "rsqrt": 8 * t}
    if st.attention == "sdpa":
        terms["attention"] = 4 * q * d * t + 4 * a.heads * t
        terms["attention_mask"] = rows * seq * seq * d
    else:  # eager: q, k, v saved by the matmuls; fp32 softmax output (+ its d copy when d < 4)
        terms["attention"] = 3 * q * d * t + rows * a.heads * seq * seq * (4 + (d if d < 4 else 0))
    if d < st.lora:  # autocast keeps a d-copy of the fp32 LoRA weights for backward
        terms["lora_weight_copies"] = lora_params(a, st.lora_r) // a.layers * d
    return terms


def layer_bytes(a: Arch, rows: int, seq: int, st: Setting) -> float:
    return float(sum(layer_terms(a, rows, seq, st).values()))


def logits_bytes(a: Arch, positions: int, st: Setting) -> float:
    """Projected logits (d) + their fp32 log-softmax, + a d-copy of an fp32 lm_head under autocast."""
    copy = a.vocab * a.hidden * st.compute if st.compute < st.residual else 0
    return positions * a.vocab * (st.compute + 4) + copy


def nograd_bytes(a: Arch, rows: int, seq: int, positions: int, st: Setting) -> float:
    """Peak of a forward without grad: one layer's working set (MLP: x, normed x, gate, up, silu, product) + logits."""
    work = rows * seq * (2 * a.hidden + 4 * a.intermediate) * st.residual
    if st.attention == "eager":
        work += rows * a.heads * seq * seq * (4 + st.compute)
    return work + logits_bytes(a, positions, st)


@dataclass(frozen=True)
class Forward:
    rows: int
    seq: int
    answers: int  # answer sequences per row whose R tokens are projected
    grad: bool


def stage_forwards(stage: str, b: int, p: int, r: int, k: int, c: int, reference: bool) -> list[Forward]:
    if stage == "sft":
        return [Forward(b, p + r, 1, True)]
    if stage == "dpo":
        return [Forward(2 * b, p + r, 1, True), Forward(2 * b, p + r, 1, False)]
    if stage == "napo_shared":
        fw = [Forward(b, p + (1 + k) * r, 1 + k, True)]
        return fw + ([Forward(b, p + (1 + k) * r, 1 + k, False)] if reference else [])
    if stage == "napo_naive":
        fw = [Forward(b * (1 + k), p + r, 1, True)]
        return fw + ([Forward(b * (1 + k), p + r, 1, False)] if reference else [])
    if stage == "inference":
        return [Forward(b, p + c * r, c, False)]
    raise EstimateError(f"unknown stage {stage!r}")


def activation_bytes(a: Arch, forwards: list[Forward], r: int, st: Setting, checkpointing: bool) -> dict:
    """Activation bytes of one step: the grad forward's saved tensors (+ logits), plus any no-grad forward."""
    out = {"layers": 0.0, "logits": 0.0, "nograd": 0.0, "tokens": 0}
    for f in forwards:
        pos = f.rows * f.seq if st.full_logits else f.rows * f.answers * r
        out["tokens"] += f.rows * f.seq if f.grad else 0
        if not f.grad:
            out["nograd"] = max(out["nograd"], nograd_bytes(a, f.rows, f.seq, pos, st))
            continue
        one = layer_bytes(a, f.rows, f.seq, st)
        if checkpointing:
            out["layers"] += a.layers * f.rows * f.seq * a.hidden * st.residual + one
        else:
            out["layers"] += a.layers * one
        out["logits"] += f.rows * f.seq * a.hidden * st.residual + logits_bytes(a, pos, st)
    out["total"] = out["layers"] + out["logits"] + out["nograd"]
    return out


STAGES = ("sft", "dpo", "napo_shared", "napo_naive", "inference")
STAGE_NAMES = {"sft": "SFT", "dpo": "DPO", "napo_shared": "NAPO K={k}, shared", "napo_naive": "NAPO K={k}, naive",
               "inference": "inference ({c} cand.)"}


def setting_from(o: argparse.Namespace, training: bool) -> Setting:
    d, lora = DTYPE_BYTES[o.compute_dtype], DTYPE_BYTES[o.lora_dtype]
    return Setting(compute=d, residual=4 if training else d, mask=1 if o.device == "cuda" else lora,
                   attention=o.attention, lora_r=o.lora_r, full_logits=o.full_logits, lora=lora)


def estimate(a: Arch, o: argparse.Namespace) -> list[dict]:
    """One dict per stage x checkpointing (inference: one, no backward)."""
    rows, n_lora = [], lora_params(a, o.lora_r)
    for stage in STAGES:
        training = stage != "inference"
        st = setting_from(o, training)
        b = o.batch if training else (o.infer_batch or o.batch)
        fw = stage_forwards(stage, b, o.prompt_tokens, o.answer_tokens, o.negatives, o.candidates,
                            o.napo_reference)
        weights = weight_bytes(a, other_bytes=4 if training else st.compute)
        lora = n_lora * (st.lora * 4 if training else 4)  # weight + grad + 2 AdamW states; peft loads fp32
        for ckpt in ((False, True) if training else (None,)):
            act = activation_bytes(a, fw, o.answer_tokens, st, bool(ckpt))
            rows.append({"stage": stage, "name": STAGE_NAMES[stage].format(k=o.negatives, c=o.candidates),
                         "checkpointing": ckpt, "rows": fw[0].rows, "seq": fw[0].seq, "tokens": fw[0].rows * fw[0].seq,
                         "weights": weights, "lora_optimizer": lora, "activations": act["total"],
                         "activation_parts": act, "total": weights + lora + act["total"]})
    return rows


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}" if x >= GIB else f"{x / GIB:.3f}"


def markdown(a: Arch, o: argparse.Namespace, rows: list[dict]) -> str:
    c = param_counts(a)
    head = (f"Model: {o.config or o.model}: {c['total'] / 1e9:.3f}B parameters ({c['linear'] / 1e9:.3f}B in NF4), "
            f"LoRA r={o.lora_r}: {lora_params(a, o.lora_r) / 1e6:.2f}M trainable. Per-device batch {o.batch}, "
            f"prompt {o.prompt_tokens} + answer {o.answer_tokens} tokens, LoRA {o.lora_dtype}, compute "
            f"{o.compute_dtype} on {o.device}, {o.attention} attention. GiB; estimates (memory_estimate.py), "
            f"not measurements.\n")
    lines = ["| stage | checkpointing | rows x tokens | weights | LoRA+optimizer | activations | total |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ck = {None: "n/a (no grad)", True: "on", False: "off"}[r["checkpointing"]]
        lines.append(f"| {r['name']} | {ck} | {r['rows']} x {r['seq']} | {_gib(r['weights'])} | "
                     f"{_gib(r['lora_optimizer'])} | {_gib(r['activations'])} | {_gib(r['total'])} |")
    st = setting_from(o, True)
    per_tok = layer_bytes(a, 1, o.prompt_tokens + o.answer_tokens, st) / (o.prompt_tokens + o.answer_tokens)
    foot = (f"\nActivations saved per token and layer (training, one row of s = P + R tokens): "
            f"{per_tok:,.0f} B = {per_tok / a.hidden:.1f}*h (Korthikanti et al.'s GPT count: 34*h + 5*a*s).")
    return head + "\n" + "\n".join(lines) + "\n" + foot


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2 (argparse's default prints the usage too)
        raise EstimateError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="memory_estimate.py", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", choices=sorted(PRESETS), default=None, help="a preset (default llama2-7b)")
    src.add_argument("--config", default=None, help="a Hugging Face Llama config.json")
    add = p.add_argument
    add("--batch", type=int, default=4, help="per-device training batch (the NAPO authors': 4)")
    add("--infer_batch", type=int, default=None, help="per-device inference batch (default: --batch)")
    add("--prompt_tokens", type=int, default=200, help="prompt tokens P (~200 with a 7B Llama tokenizer)")
    add("--answer_tokens", type=int, default=6, help="answer tokens R (title + EOS)")
    add("--cutoff", type=int, default=512, help="the stages' --cutoff_len: P + R must fit")
    add("--negatives", type=int, default=3, help="NAPO's K")
    add("--candidates", type=int, default=20, help="candidates ranked at inference")
    add("--lora_r", type=int, default=8, help="LoRA rank (the authors': 8)")
    add("--compute_dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="bf16 (CUDA) or fp32 (CPU)")
    add("--lora_dtype", choices=sorted(DTYPE_BYTES), default="fp32", help="bf16: as TRL casts a 4-bit model's LoRA")
    add("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: dropout masks as float, not bool")
    add("--attention", choices=("sdpa", "eager"), default="sdpa", help="eager: the s^2 scores are saved too")
    add("--full_logits", action="store_true", help="project every position (transformers < 5.24)")
    add("--napo_reference", action="store_true", help="NAPO with a reference model (S-DPO); default reference-free")
    add("--json", action="store_true", help="print JSON instead of the table")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    o = build_parser().parse_args(argv)
    for k in ("batch", "prompt_tokens", "answer_tokens", "cutoff", "negatives", "candidates", "lora_r"):
        if getattr(o, k) < 1:
            raise EstimateError(f"--{k} {getattr(o, k)}: must be >= 1")
    if o.infer_batch is not None and o.infer_batch < 1:
        raise EstimateError(f"--infer_batch {o.infer_batch}: must be >= 1")
    if o.prompt_tokens + o.answer_tokens > o.cutoff:
        raise EstimateError(f"--prompt_tokens {o.prompt_tokens} + --answer_tokens {o.answer_tokens} is over "
                            f"--cutoff {o.cutoff} (the stages never truncate a row)")
    if o.model is None and o.config is None:
        o.model = "llama2-7b"
    return o


def main(argv=None) -> int:
    try:
        o = parse_args(argv)
        a = load_arch(o.model, o.config)
        rows = estimate(a, o)
    except EstimateError as e:
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)
        return 2
    if o.json:
        print(json.dumps({"arch": asdict(a), "params": param_counts(a), "lora_params": lora_params(a, o.lora_r),
                          "options": vars(o), "rows": rows}, indent=1))
    else:
        print(markdown(a, o, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
