"""The embedded default model's build: its recipes, tokenizer, build loop, name and cache.

`--base_model tiny` (and `tiny-nocopy`) is built here on first use into `<cache>/models/tiny-<12 hex>`
(offline, deterministic for a given machine and torch thread count): a ~5M-parameter Llama with a copy head
(tiny_model.py) and a byte-level BPE tokenizer trained on the dataset's text, every title one token of its own.
It stands in for a pretrained LLM, so it starts from what an LLM knows about which artists go together
(cooc.py: the item embeddings from the train users' co-listening) and is then pretrained on the train split's
listening windows and on content-free list prompts (pretrain_data.py, pretrain_loss.py). The build ends with the
list-recall probe (probes.py) and records everything in `napo_build.json` (options, data fingerprint,
`state_sha256` of the weights, timings, the probe). docs/embedded_model.md has the design and its figures.

The cache folder's name (tiny_name) is the hash of the builder version, the build options, the data's
fingerprint and the prompt templates: any change of recipe builds a new model, and reproduce.py's records name
the build they were made on. CLI: `python tiny_build.py build --recipe tiny|tiny-nocopy|tiny-bpe`.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

import cache
import cooc
import data_interface as di
import pretrain_data
import pretrain_loss
import probes
import tokens
from errors import ModelError

TINY_DEFAULTS = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                     intermediate_size=688, bpe_vocab_size=2000, item_tokens=True,
                     # pretrain_lr 1e-3, not 2e-3: from the co-listening start the higher rate lost sequence
                     # knowledge in some seeds (docs/embedded_model.md, "The build's learning rate")
                     pretrain_epochs=3, pretrain_lr=1e-3, pretrain_window=24, pretrain_recall=0.4,
                     pretrain_max_steps=None,
                     # the floor of content-free list prompts per epoch (pretrain_data.list_prompt_count): the list
                     # skill must not shrink with the domain data (a 1,000-row dataset gave ~20 prompts an epoch,
                     # 6 build steps and a probe of 0.000). It enters the name's hash only where it binds
                     # (tiny_name): on LastFM every recipe makes more (tiny: 1,049-1,275 an epoch, 0.4 x 2,623-3,189
                     # windows), so LastFM's builds from before the floor keep their weights and their names
                     pretrain_list_min=1000,
                     pretrain_dense_copy=None,  # copy documents per window (pretraining_docs); None = none
                     # "cooc": every whole-title token's embedding starts as its train co-listening vector
                     # (cooc.py: pairs at most pretrain_embed_window apart), its entries' root mean square
                     # pretrain_embed_rms (the random rows': initializer_range 0.02; 0.0625 gives rows of length
                     # 1.0 at hidden 256); None = the random initialisation
                     pretrain_embed_init="cooc", pretrain_embed_window=8, pretrain_embed_rms=0.0625,
                     pretrain_pack=True,  # False: one padded row per document (the benchmark's baseline)
                     copy_head=True,
                     # "lm": a list answer's first token reaches the model only through the copy head (its
                     # LM-head logits detached), so the list loss never pushes down the titles the history
                     # suggests; None: everywhere (tiny-nocopy, tiny-bpe)
                     pretrain_list_detach="lm",
                     copy_next=None,  # True: the copy head's next-token votes too (tiny-bpe); None = off
                     copy_next_match=None,  # True: those votes only from continuations of the query's token
                     copy_entries=None,  # True: the copy votes follow the list's quoted entries (list_delimiters)
                     bpe_colon_space=None,  # True: build_tiny_tokenizer's colon_space (tiny-bpe); None = off
                     probe_rows=500,
                     # a build whose list probe (P(answer in list)) ends below this stops with a ModelError
                     # (check_probe); None: not held to one (tiny-nocopy: without the copy head it never gets
                     # there). Not in the name
                     probe_min=0.9,
                     seed=0)
_NOT_IN_NAME = ("probe_min",)  # options that do not change what a build produces
# Options of builds before today's that were retired (docs/history.md has what they measured), at the values every
# build of today's recipes had: they stay in the name's hash, so the builds keep their names and the committed
# records of reproduce.py stay valid.
_RETIRED_NAME_VALUES = dict(pretrain_list_loss="set", pretrain_length_pool=1)
# tiny-bpe, a research recipe (titles in BPE pieces; not a --base_model name: it answers from the list but ranks
# near chance): the copy head's next-token votes (only from continuations of the query's own token: an induction
# head) along the list's quoted entries (the first votes from entries' first pieces, the end of an entry voting
# for EOS); more list prompts and some dense copy documents, fewer epochs
TINY_BPE = dict(item_tokens=False, bpe_colon_space=True, copy_next=True, copy_next_match=True, copy_entries=True,
                pretrain_epochs=4, pretrain_lr=2e-3, pretrain_recall=1.5, pretrain_dense_copy=0.3,
                pretrain_list_detach=None,  # its measured recipe; not measured with "lm"
                pretrain_embed_init=None)  # its titles are several tokens: no whole-title token to initialise
# the embedded models by --base_model name: their build options on top of TINY_DEFAULTS. `tiny-nocopy`: the same
# recipe without the copy head (a plain Llama; its list prompts train the LM head): after SFT it puts only a small
# part of its probability on the 20 candidates, where `tiny` puts ~99.7%, so a preference stage's loss is not
# SFT's there (docs/method.md, "SFT is listwise S-DPO")
EMBEDDED = {"tiny": {}, "tiny-nocopy": dict(copy_head=False, pretrain_list_detach=None, probe_min=None)}
RECIPES = {**EMBEDDED, "tiny-bpe": TINY_BPE}  # what `python tiny_build.py build --recipe` builds
BUILDER_VERSION = 7  # bump when build_tiny changes what it produces


def _titles_safe_as_tokens(catalog: di.ItemCatalog) -> list[str]:
    """Titles that can be whole tokens: not a whole word of the template text (which would then be
    swallowed by the title token) and unique."""
    text = " ".join(di.TEMPLATES)
    seen, out = set(), []
    for name in catalog.names:
        if name in seen or name != name.strip() or '"' in name:
            continue
        seen.add(name)
        if re.search(r"(?<!\w)" + re.escape(name) + r"(?!\w)", text):
            continue
        out.append(name)
    return out


def build_tiny_tokenizer(catalog: di.ItemCatalog, bpe_vocab_size=2000, item_tokens=True, colon_space=False):
    """A byte-level BPE tokenizer trained on the dataset's text (templates + titles). With item_tokens,
    every safe title is also one whole token (it absorbs the space before it), so a title costs one token;
    without, titles are split into BPE pieces like in any real LLM. colon_space: the space after a colon is a
    token of its own, so an answer after "Answer:" is the same tokens as the title written in the prompt's
    quotes ("Robert Miles" and "Answer: Robert Miles" both give Robert ĠMil es); without, the answer's first
    token differs from the listed title's (ĠRobert vs Robert) and no copy mechanism can carry it over."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if colon_space:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"(?<=:) "), behavior="isolated"),
                                                     tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    names = catalog.names
    corpus = list(di.TEMPLATES) * 50 + [di.quote_titles(catalog, list(range(i, min(i + 5, len(names)))))
                                        for i in range(0, len(names), 5)] + [f" {n}" for n in names]
    tok.train_from_iterator(corpus, trainer=trainer)
    if item_tokens:
        # the list separator of prompts (", " between quoted titles) as one token, then one token per title
        tok.add_tokens([AddedToken('", "', normalized=False)])
        tok.add_tokens([AddedToken(n, single_word=True, lstrip=True, normalized=False)
                        for n in _titles_safe_as_tokens(catalog)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.padding_side = "left"
    return fast


def tiny_tokenizer(catalog: di.ItemCatalog, opts: dict):
    """build_tiny_tokenizer with a build's options (TINY_DEFAULTS and overrides)."""
    return build_tiny_tokenizer(catalog, opts["bpe_vocab_size"], opts["item_tokens"], bool(opts.get("bpe_colon_space")))


def new_tiny_llama(tokenizer, opts: dict):
    """A freshly initialised model of the embedded model's shape (`opts`: hidden_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads, intermediate_size, copy_head) for a tokenizer, with tied
    embeddings: a Llama with tiny_model's copy head, or (copy_head=False) a plain Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import tiny_model

    kw = dict(
        vocab_size=len(tokenizer), hidden_size=opts["hidden_size"], intermediate_size=opts["intermediate_size"],
        num_hidden_layers=opts["num_hidden_layers"], num_attention_heads=opts["num_attention_heads"],
        num_key_value_heads=opts["num_key_value_heads"], max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    if opts.get("copy_head", True):
        opening, closing, starts = tokens.list_delimiters(tokenizer) if opts.get("copy_entries") else (None, None, None)
        return tiny_model.TinyCopyForCausalLM(tiny_model.TinyCopyConfig(
            copy_next=bool(opts.get("copy_next")), copy_next_match=bool(opts.get("copy_next_match")),
            copy_open_ids=opening, copy_close_ids=closing,
            copy_start_ids=starts, **kw))
    return LlamaForCausalLM(LlamaConfig(**kw))


def pretrain(model, tokenizer, catalog, opts: dict, log=print) -> dict:
    """Domain pretraining of the embedded model (pretrain_data's documents, pretrain_loss's loss): AdamW at
    pretrain_lr with a linear warm-up and a cosine decay, gradients clipped at 1.0. Train users only; val/test
    users are disjoint, so nothing of the evaluation data is seen. Returns where the time went (the profile
    napo_build.json keeps): seconds of steps vs tokenising and padding, and the share of padded positions."""
    t0 = time.time()
    batches = pretrain_data.pretrain_batches(tokenizer, catalog, opts)
    seconds_tokenise = time.time() - t0
    total = min(len(batches), opts["pretrain_max_steps"] or len(batches))
    opt = torch.optim.AdamW(model.parameters(), lr=opts["pretrain_lr"], weight_decay=0.01)
    warm = max(1, min(50, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    model.train()
    t0 = time.time()
    prof = dict(seconds_tokenise_pad=seconds_tokenise, seconds_steps=0.0, tokens=0, padded_positions=0)
    for step, batch in enumerate(batches[:total], 1):
        ta = time.time()
        inputs = pretrain_loss.batch_inputs(model, batch, tokenizer.pad_token_id, opts["pretrain_pack"])
        prof["tokens"] += inputs["tokens"]
        prof["padded_positions"] += inputs["positions"]
        tb = time.time()
        prof["seconds_tokenise_pad"] += tb - ta
        loss = pretrain_loss.batch_loss(model, inputs, opts.get("pretrain_list_detach"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        prof["seconds_steps"] += time.time() - tb
        if step % 100 == 0 or step == total:
            log(f"[tiny] pretrain step {step}/{total} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    prof = {**{k: round(v, 1) if isinstance(v, float) else v for k, v in prof.items()}, "steps": total,
            "threads": torch.get_num_threads(), "packed": opts["pretrain_pack"],
            "padding_share": round(1 - prof["tokens"] / max(1, prof["padded_positions"]), 3)}
    log(f"[tiny] pretrain: {total} steps in {prof['seconds_steps']:.0f}s of forward/backward/AdamW, "
        f"{prof['seconds_tokenise_pad']:.1f}s tokenising and padding; {prof['padding_share']:.0%} of the "
        f"positions are padding ({torch.get_num_threads()} threads)", flush=True)
    return prof


def check_recipe(opts: dict) -> None:
    """The build options' rules (a ModelError naming the option), before anything is built."""
    unknown = sorted(set(opts) - set(TINY_DEFAULTS))
    if unknown:
        retired = [k for k in unknown if k in _RETIRED_NAME_VALUES or k in ("pretrain_distill_start", "pretrain_list_history")]
        raise ModelError(f"build option {unknown[0]!r}: " + ("retired (docs/history.md has what it measured)" if retired
                         else f"unknown (the options: {', '.join(TINY_DEFAULTS)})"))
    if opts["pretrain_pack"] not in (True, False):
        raise ModelError(f"pretrain_pack {opts['pretrain_pack']!r}: True (documents packed into rows) or False (one per row)")
    c = opts["pretrain_dense_copy"]
    if c is not None and (not isinstance(c, (int, float)) or not 0 <= c <= 1):
        raise ModelError(f"pretrain_dense_copy {c!r}: None, or the number of copy documents per window (0..1)")
    if opts["pretrain_list_detach"] not in (None, False, "lm") or (opts["pretrain_list_detach"] and not opts["copy_head"]):
        raise ModelError(f"pretrain_list_detach {opts['pretrain_list_detach']!r}: None (off) or \"lm\" (the default; "
                         "it needs the copy head: with copy_head=False pass pretrain_list_detach=None)")
    if opts["copy_entries"] not in (None, False, True):
        raise ModelError(f"copy_entries {opts['copy_entries']!r}: None (off) or True (the votes follow the list's entries)")
    if opts["copy_entries"] and not (opts["copy_next"] and opts["copy_next_match"]):
        raise ModelError("copy_entries needs copy_next and copy_next_match (it extends the matched next-token votes)")
    if opts["pretrain_embed_init"] not in (None, "cooc"):
        raise ModelError(f"pretrain_embed_init {opts['pretrain_embed_init']!r}: None (random) or \"cooc\" (train co-listening)")
    w, rms = opts["pretrain_embed_window"], opts["pretrain_embed_rms"]
    if not isinstance(w, int) or isinstance(w, bool) or w < 1:
        raise ModelError(f"pretrain_embed_window {w!r}: a whole number >= 1 (how far apart two co-listened items may be)")
    if not isinstance(rms, (int, float)) or isinstance(rms, bool) or not rms > 0:
        raise ModelError(f"pretrain_embed_rms {rms!r}: a number > 0 (the initialised embedding entries' root mean square)")
    m, q = opts["pretrain_list_min"], opts["probe_min"]
    if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 0):
        raise ModelError(f"pretrain_list_min {m!r}: None, or a whole number >= 0 (the fewest list prompts per epoch)")
    if q is not None and (not isinstance(q, (int, float)) or isinstance(q, bool) or not 0 <= q <= 1):
        raise ModelError(f"probe_min {q!r}: None, or the list probe a build must reach (0..1)")


def build_tiny(dataset="lastfm", output_dir=None, **overrides) -> Path:
    """Build the embedded model for a dataset into `output_dir` (deterministic, offline): tokenizer, the
    co-listening start, pretraining, the list-recall probe, then the weights, tokenizer and napo_build.json."""
    opts = {**TINY_DEFAULTS, **overrides}
    check_recipe(opts)
    t_build = time.time()
    catalog = di.load_catalog(dataset)
    torch.manual_seed(opts["seed"])
    tokenizer = tiny_tokenizer(catalog, opts)
    model = new_tiny_llama(tokenizer, opts)
    profile = embed = None
    if opts["pretrain_embed_init"] == "cooc":
        t0 = time.time()
        norm = opts["pretrain_embed_rms"] * math.sqrt(opts["hidden_size"])
        embed = {"titles": cooc.init_item_embeddings(model, tokenizer, catalog, opts["pretrain_embed_window"], norm),
                 "row_length": norm, "seconds": None}
        embed["seconds"] = round(time.time() - t0, 1)
        print(f"[tiny] embeddings of {embed['titles']} whole-title tokens from train co-listening (PPMI within "
              f"{opts['pretrain_embed_window']}, rows of length {norm:.3g}) in {embed['seconds']:.0f}s", flush=True)
    if opts["pretrain_epochs"] > 0:
        profile = pretrain(model, tokenizer, catalog, opts)
    probe = probes.list_recall_probe(model, tokenizer, catalog, rows=opts["probe_rows"])
    print(f"[tiny] list recall: P(answer in list) {probe['p_answer_in_list']:.3f} on {probe['rows']} content-free "
          f"prompts (P(answer in history) {probe['p_answer_in_history']:.3f}; chance {di.NUM_CANDIDATES / catalog.n_items:.3f}); "
          f"its top candidate is its window continuation's top in {probe['top1_agrees_with_window']:.0%} (chance 5%)",
          flush=True)
    check_probe(probe, opts, catalog)
    seconds_build = round(time.time() - t_build, 1)
    print(f"[tiny] built in {seconds_build:.0f}s (tokenizer, documents, pretraining, probe)", flush=True)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"builder_version": BUILDER_VERSION, "dataset": catalog.name, "options": opts,
            "data_fingerprint": di.data_fingerprint(catalog), "n_params": sum(p.numel() for p in model.parameters()),
            "state_sha256": state_hash(model), "seconds_build": seconds_build, "embed_init": embed,
            "pretrain_profile": profile, "list_recall_probe": probe}
    (out / "napo_build.json").write_text(json.dumps(info, indent=2))
    return out


def check_probe(probe: dict, opts: dict, catalog: di.ItemCatalog) -> None:
    """A build whose list probe ends below its recipe's probe_min is no stand-in for an LLM (it cannot answer from
    the candidate list): a ModelError saying so, before anything is saved. A build cut short on purpose
    (pretrain_max_steps, or pretrain_epochs 0: the tests' and timing checks' builds) is kept, with a warning."""
    need, got = opts.get("probe_min"), probe["p_answer_in_list"]
    if need is None or got >= need:
        return
    what = (f"the embedded model built for {catalog.path} reached P(answer in list) {got:.3f} on {probe['rows']} "
            f"content-free prompts, below its recipe's probe_min {need}: it cannot answer from the candidate list")
    if opts["pretrain_max_steps"] or not opts["pretrain_epochs"]:
        print(f"warning: {what} (kept: a build cut short by pretrain_max_steps or pretrain_epochs 0)",
              file=sys.stderr, flush=True)
        return
    more = 4 * max(opts["pretrain_list_min"] or 0, 1000)
    raise ModelError(f"{what}; nothing was cached. Build it with more list prompts: python -c \"import tiny_build; "
                     f"print(tiny_build.tiny_path('{catalog.path}', pretrain_list_min={more}))\" and pass the folder "
                     "it prints as --base_model (or pass a pretrained model folder)")


def state_hash(model) -> str:
    """sha256 over the model's state dict (names, shapes and fp32 bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def tiny_name(dataset="lastfm", **overrides) -> str:
    """The embedded model's identity, without building it: tiny-<12 hex digits> of the builder version, the
    build options (with the retired ones at the values every build had), the data's fingerprint and the prompt
    templates (the tokenizer is trained on them) — the cache folder's name, and what reproduce.py's records say
    a stage was run on. `dataset`: a name, a folder or an ItemCatalog."""
    catalog = dataset if isinstance(dataset, di.ItemCatalog) else di.load_catalog(dataset)
    opts, fingerprint = {**TINY_DEFAULTS, **overrides}, di.data_fingerprint(catalog)
    keyed = {k: v for k, v in {**_RETIRED_NAME_VALUES, **opts}.items() if v is not None and k not in _NOT_IN_NAME}
    if not _list_floor_binds(catalog, fingerprint, opts):  # the same documents as without it: the same model
        keyed.pop("pretrain_list_min", None)
    key = hashlib.sha256(json.dumps([BUILDER_VERSION, keyed, fingerprint, di.TEMPLATES],
                                    sort_keys=True).encode()).hexdigest()[:12]
    return f"tiny-{key}"


_WINDOW_COUNTS: dict = {}


def _list_floor_binds(catalog: di.ItemCatalog, fingerprint: str, opts: dict) -> bool:
    """Whether pretrain_list_min raises the list prompts of some epoch above the recall share of its windows
    (the window counts cached per process by the data's fingerprint)."""
    floor, epochs = opts.get("pretrain_list_min"), opts["pretrain_epochs"]
    if not floor or epochs <= 0:
        return False
    key = (fingerprint, epochs, opts["pretrain_window"])
    if key not in _WINDOW_COUNTS:
        _WINDOW_COUNTS[key] = pretrain_data.window_counts(catalog, epochs, opts["pretrain_window"])
    return any(pretrain_data.list_prompt_count(opts["pretrain_recall"], n) < floor for n in _WINDOW_COUNTS[key])


def file_state_hash(folder) -> str:
    """state_hash of a built model, read from its saved weights without building the model (the tied LM head,
    which the file does not repeat, is the embedding's): ~0.03 s for the 4.9M parameters of `tiny`."""
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / "model.safetensors"))
    if json.loads((Path(folder) / "config.json").read_text()).get("tie_word_embeddings"):
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


_VERIFIED: set = set()


def cached_model_problem(folder) -> str | None:
    """What is wrong with a cached build (None: sound): its config, tokenizer or weights files unreadable or
    cut short (cache.model_folder_problem), napo_build.json missing or unreadable, or its weights not the state
    the build recorded (state_sha256; hashed once per process while the file keeps its size and mtime)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    why = cache.model_folder_problem(folder) or (None if (folder / "model.safetensors").exists()
                                                 else "model.safetensors is missing")
    if why:
        return why
    rec, why = cache.read_json(folder / "napo_build.json")
    if why or not isinstance(rec.get("state_sha256"), str):
        return f"napo_build.json {'is ' + why if why else 'has no state_sha256'}"
    st = (folder / "model.safetensors").stat()
    stamp = (str(folder.resolve()), st.st_size, st.st_mtime_ns, rec["state_sha256"])
    if stamp in _VERIFIED:
        return None
    try:
        have = file_state_hash(folder)
    except Exception as e:  # noqa: BLE001  (whatever a damaged file raises: it is reported, then rebuilt)
        return f"model.safetensors is unreadable ({type(e).__name__})"
    if have != rec["state_sha256"]:
        return f"model.safetensors holds other weights than napo_build.json's state_sha256 {rec['state_sha256'][:12]}"
    _VERIFIED.add(stamp)
    return None


def embedded_name(base_model: str, dataset="lastfm") -> str | None:
    """tiny_name of an embedded --base_model (`tiny`, `tiny-nocopy`) without building it; None for any other."""
    return tiny_name(dataset, **EMBEDDED[base_model]) if base_model in EMBEDDED else None


def tiny_path(dataset="lastfm", **overrides) -> Path:
    """The cached embedded model for a dataset and build options; built on first use. The cache folder is
    named by content only (tiny_name), never by the dataset folder's name: the same data under another folder
    name reuses the model. The train split is checked (every row, file:line errors) before anything is built."""
    opts = {**TINY_DEFAULTS, **overrides}
    check_recipe(opts)
    catalog = di.load_catalog(dataset)
    name = tiny_name(catalog, **overrides)
    key = name[len("tiny-"):]
    models = cache.cache_root() / "models"
    target = models / name
    if not (target / "config.json").exists():
        legacy = [p for p in models.glob(f"tiny-*-{key}") if (p / "config.json").exists()] if models.is_dir() else []
        why = cached_model_problem(legacy[0]) if legacy else None
        if legacy and not why:  # a cache made before the folder was keyed by content only (tiny-<dataset>-<key>):
            return legacy[0]  # the same model; used where it is (a running job may hold that path)
        if why:
            print(f"warning: {legacy[0]}: damaged cached model ({why}); rebuilding it as {target}", file=sys.stderr,
                  flush=True)
        di.load_split(catalog, "train")  # the whole train split parses before a build starts
        pretrain_data.user_sequences(catalog, "train")
    # a damaged or partial cached model is reported in one line and rebuilt, never served
    return cache.build_once(target, lambda tmp: build_tiny(catalog.path, tmp, **opts), problem=cached_model_problem)


def build(dataset: str = "lastfm", recipe: str = "tiny"):
    """Build (or find) the cached embedded model of a recipe and print its folder, which any stage takes as
    --base_model.

    Args:
        dataset: a dataset name under data/ or a dataset folder.
        recipe: tiny (the default --base_model), tiny-nocopy (without the copy head) or tiny-bpe (titles in BPE
            pieces: a research recipe).
    """
    if recipe not in RECIPES:
        raise ModelError(f"--recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    path = tiny_path(dataset, **RECIPES[recipe])
    print(path)
    return str(path)


if __name__ == "__main__":
    import cli

    cli.run({"build": cli.validated(build)})
