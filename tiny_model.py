"""The embedded default's architecture: a Llama with a copy head (model type `napo_tiny`).

A 7B LLM answers from a list in its prompt out of the box; it learned to from web text. A 4-layer model
trained on listening sequences does not: a LastFM sequence never repeats an artist, so its training teaches
"never name a title that is in the context", and from a standard initialisation it did not discover
in-context copying within any build budget we tried (docs/embedded_model.md). So the stand-in gets
the mechanism as architecture, the way pointer-generator networks do, and learns *when* to use it from
content-free data (pretrain_data.pretraining_docs):

    logits[t] = lm_head(h)[t] + exp(scale) * sum_i sigmoid(q(h) . k(h_i) / sqrt(d) + bias) * [x_i == t]

h is the last hidden state at the predicting position, h_i and x_i the hidden state and token id at every
position it may attend to (the same causal / padding / custom 4-D mask as the attention layers). Each
position i independently votes (sigmoid, not softmax: a list of 20 gets the same lift as a list of 2) for
its own token. The lift is exact: a token that is not in the context gets none, so the domain prior
(lm_head) still ranks the listed titles against each other. q and k are called `copy_query`/`copy_key`, not
`*_proj`, so LoRA (modeling.LORA_TARGETS) leaves them alone: SFT and preference stages train what the model
prefers, not where the list is.

With `copy_next` (titles that span several tokens, `--base_model tiny-bpe`) a second set of votes copies the
*rest* of a title, as an induction head does: every position j votes for its own token x_j with a key read
at the position before it (its predecessor: the last earlier position j attends to),

    + exp(scale') * sum_j sigmoid(q'(h) . k'(h_pred(j)) / sqrt(d) + bias') * [x_j == t]

so a query whose answer so far matches a listed title's prefix lifts that title's next token. With
`copy_next_match` (tiny-bpe's recipe) only the positions whose predecessor holds the query's own token vote
(x_pred(j) == x_t: an induction head by construction, as prompt-lookup decoding matches n-grams); the
learned q'·k' then only chooses among those continuations (the unrestricted votes were not learned within a
build's budget: docs/embedded_model.md).

With `copy_open_ids` / `copy_close_ids` (tiny-bpe's recipe: the tokens that open and close a quoted list entry,
tokens.list_delimiters) the votes follow the list's entries, as a pointer network over them does: the first
votes come only from positions right after an opening token (an entry's first piece: a title's remaining
pieces and the answer's own tokens do not vote there), and a next-token vote for a closing token is a vote for
EOS (the answer ends where the listed entry ends; its key, read at the entry's last piece, cannot tell a
continuation from the end). With `copy_start_ids` a continuation must match the query on two tokens, its own
and the one before (an entry's start and the space before the answer counting as one token), so an answer
whose last piece also ends another title's piece does not jump to that title.

During cached generation the copy keys and ids of earlier positions ride on the cache object
(`cache.napo_copy`, and `cache.napo_next` for the next-token votes); greedy and constrained decoding
(inference.generate) give the same logits as a full forward (tests/test_tiny_model.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast


class TinyCopyConfig(LlamaConfig):
    model_type = "napo_tiny"

    def __init__(self, copy_dim: int = 32, copy_bias: float = -2.0, copy_log_scale: float = 2.75,
                 copy_next: bool = False, copy_next_match: bool = False, copy_open_ids=None, copy_close_ids=None,
                 copy_start_ids=None, **kwargs):
        self.copy_dim = copy_dim              # width of the copy head's query/key
        self.copy_bias = copy_bias            # initial bias of each vote (sigmoid(-2) = 0.12)
        self.copy_log_scale = copy_log_scale  # initial log of a full vote's lift (e^2.75 = 15.6 logits)
        self.copy_next = copy_next            # also the "next-token" votes (multi-token titles; see the module)
        self.copy_next_match = copy_next_match  # those votes only where the predecessor is the query's token
        self.copy_open_ids = copy_open_ids    # first votes only right after these tokens (list entries' starts)
        self.copy_close_ids = copy_close_ids  # next-token votes for these count for EOS (list entries' ends)
        self.copy_start_ids = copy_start_ids  # match votes on two tokens, these counting as one (entries' starts)
        super().__init__(**kwargs)


def allowed_positions(attention_mask, q_len: int, k_len: int, device) -> torch.Tensor:
    """(B or 1, q_len, k_len) bool: which positions each query may read, as the attention layers do:
    causal (+ the 2-D padding mask) or, for a 4-D custom mask (scoring.py's shared prompts), that mask
    (bool: True = attend; float: additive, 0 = attend)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask[:, 0, -q_len:, -k_len:]
        return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)[None]
    if attention_mask is None:
        return causal
    return causal & attention_mask[:, None, -k_len:].bool()


class TinyCopyForCausalLM(LlamaForCausalLM):
    config_class = TinyCopyConfig

    def __init__(self, config):
        super().__init__(config)
        if (config.copy_open_ids or config.copy_close_ids or config.copy_start_ids) and not config.copy_next:
            raise ValueError("napo_tiny: copy_open_ids / copy_close_ids / copy_start_ids need copy_next (they read "
                             "each position's predecessor)")
        self.copy_query = nn.Linear(config.hidden_size, config.copy_dim, bias=False)
        self.copy_key = nn.Linear(config.hidden_size, config.copy_dim, bias=False)
        self.copy_gate = nn.Parameter(torch.tensor([config.copy_bias, config.copy_log_scale]))  # vote bias, log scale
        if getattr(config, "copy_next", False):
            self.copy_next_query = nn.Linear(config.hidden_size, config.copy_dim, bias=False)
            self.copy_next_key = nn.Linear(config.hidden_size, config.copy_dim, bias=False)
            self.copy_next_gate = nn.Parameter(torch.tensor([config.copy_bias, config.copy_log_scale]))
        self.post_init()

    def copy_votes(self, hidden, keys, allowed, query=None, gate=None):
        """(B, q, k) weight of each attended position's vote for its token."""
        query = self.copy_query if query is None else query
        gate = self.copy_gate if gate is None else gate
        scores = query(hidden) @ keys.transpose(1, 2) / math.sqrt(keys.shape[-1])
        w = torch.sigmoid(scores + gate[0]) * gate[1].exp()
        return w.masked_fill(~allowed, 0.0)

    @staticmethod
    def _ids(token_ids, like) -> torch.Tensor:
        return torch.tensor(token_ids, dtype=torch.long, device=like.device)

    def next_keys(self, h, input_ids, attention_mask, state):
        """(keys (B, K, d), has_pred (B, K), pred_ids (B, K)) of the next-token votes: each position's key is
        copy_next_key of its predecessor's hidden state — the last earlier position it attends to (the previous
        token in a plain or padded row; none for a document's first token in packed rows or a pad's neighbour)
        — and pred_ids that predecessor's token. Cached generation appends one contiguous step at a time, its
        predecessor the previous position."""
        raw = self.copy_next_key(h)
        B, q_len, d = raw.shape
        prev = getattr(state, "napo_next", None) if state is not None else None
        if prev is not None:  # cached: the new positions follow the cached ones
            keys = torch.cat([prev[0], torch.cat([prev[2], raw[:, :-1]], 1)], 1)
            ones = torch.ones(B, q_len, dtype=torch.bool, device=h.device)
            new_pred = torch.cat([prev[4], input_ids[:, :-1]], 1)
            has = torch.cat([prev[1], ones], 1)
            pred_ids = torch.cat([prev[3], new_pred], 1)
            has2 = torch.cat([prev[5], torch.cat([prev[1][:, -1:], ones[:, :-1]], 1)], 1)
            pred2_ids = torch.cat([prev[6], torch.cat([prev[3][:, -1:], new_pred[:, :-1]], 1)], 1)
        else:
            rows = allowed_positions(attention_mask, q_len, q_len, h.device).expand(B, q_len, q_len)
            earlier = rows & torch.ones(q_len, q_len, dtype=torch.bool, device=h.device).tril(-1)
            has = earlier.any(-1)
            pred = (earlier * torch.arange(q_len, device=h.device)).argmax(-1)  # (B, q) the last earlier one
            keys = raw.gather(1, pred[..., None].expand(B, q_len, d))
            pred_ids = input_ids.gather(1, pred)
            has2, pred2_ids = has & has.gather(1, pred), pred_ids.gather(1, pred)  # the predecessor's predecessor
        if state is not None:
            state.napo_next = (keys, has, raw[:, -1:], pred_ids, input_ids[:, -1:], has2, pred2_ids)
        return keys, has, pred_ids, has2, pred2_ids

    def __setattr__(self, name, value):
        # TRL's trainers (SFT, DPO) call add_fused_lm_head, which replaces `model.forward` by one that, given
        # fused_lm_head=True, projects the backbone's hidden states through lm_head itself — skipping the copy
        # head, so SFT would train a different model from the one that is evaluated. This forward answers
        # fused_lm_head=True itself (fused_outputs), so that replacement is declined.
        code = getattr(getattr(value, "__func__", value), "__code__", None)  # functools.wraps renames it "forward"
        if name == "forward" and code is not None and code.co_name == "_fused_forward":
            return
        super().__setattr__(name, value)

    def fused_outputs(self, logits, labels, num_items_in_batch=None):
        """What TRL's fused LM head returns (trl.trainer.utils.FusedCausalLMOutput), from the logits of the
        labelled positions only: `logits` (n, V) at the n entries of `labels` (B, T, next-token labels, already
        shifted) that are not -100, in row-major order. Per label its log-probability (with gradient), entropy,
        log Σ p², mean logit and whether it is the top token, each (B, T) and zero where the label is -100;
        loss = -Σ log p / (num_items_in_batch or their count)."""
        from trl.trainer.utils import FusedCausalLMOutput

        mask = labels != -100
        logp = logits.float().log_softmax(-1)

        def spread(v):  # (n,) values of the labelled positions -> (B, T), zero elsewhere
            return torch.zeros(labels.shape, dtype=v.dtype, device=v.device).masked_scatter(mask, v)

        target = labels[mask]
        log_probs = spread(logp.gather(-1, target[:, None])[:, 0])
        with torch.no_grad():
            p = logp.exp()
            entropy = spread(-(p * logp).sum(-1))
            log_sum_sq = spread(torch.logsumexp(2 * logp, -1))
            mean_logits = spread(logits.float().mean(-1))
            is_top1 = spread(logits.argmax(-1) == target)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, fused_lm_head=False, shift_labels=None,
                num_items_in_batch=None, detach_lm=None, **kwargs):
        if fused_lm_head:  # TRL's trainers: per-token log-probs of the labels, through the copy head too;
            # logits only where a label is scored (an SFT row's answer: ~3 of ~90 positions), as TRL's own head does
            shifted = labels[:, 1:] if shift_labels is None else shift_labels
            keep = shifted != -100
            if shift_labels is None:
                keep = torch.nn.functional.pad(keep, (0, 1), value=False)  # the last position predicts nothing
            logits = self(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          inputs_embeds=inputs_embeds, use_cache=False, logits_to_keep=keep, **kwargs).logits
            return self.fused_outputs(logits, shifted, num_items_in_batch)
        if input_ids is None:
            raise ValueError("napo_tiny: the copy head needs input_ids (inputs_embeds alone do not name tokens)")
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=use_cache, **kwargs)
        h = out.last_hidden_state
        keys, ids = self.copy_key(h), input_ids
        state = out.cache if use_cache is not False else None
        if state is not None and getattr(state, "napo_copy", None) is not None:
            keys = torch.cat([state.napo_copy[0], keys], 1)
            ids = torch.cat([state.napo_copy[1], ids], 1)
        if state is not None:
            state.napo_copy = (keys, ids)
        B, q_len = input_ids.shape
        allowed = allowed_positions(attention_mask, q_len, keys.shape[1], h.device)
        if not getattr(self.config, "copy_next", False):
            w = self.copy_votes(h, keys, allowed)
        else:  # the next-token votes, for the same tokens
            nkeys, has, pred_ids, has2, pred2_ids = self.next_keys(h, input_ids, attention_mask, state)
            first = allowed
            if self.config.copy_open_ids:  # first votes only from an entry's first piece
                first = first & (has & torch.isin(pred_ids, self._ids(self.config.copy_open_ids, h)))[:, None, :]
            w = self.copy_votes(h, keys, first)
            voters = allowed & has[:, None, :]
            if getattr(self.config, "copy_next_match", False):  # only continuations of the query's own token
                voters = voters & (pred_ids[:, None, :] == input_ids[:, :, None])
                if self.config.copy_start_ids:  # and of the token before it (any entry start matching any other)
                    starts = self._ids(self.config.copy_start_ids, h)
                    canon = lambda x: x.masked_fill(torch.isin(x, starts), -1)  # noqa: E731
                    q_prev, q_has = pred_ids[:, -q_len:], has[:, -q_len:]  # the query's own predecessor
                    voters = voters & has2[:, None, :] & q_has[:, :, None] & (
                        canon(pred2_ids)[:, None, :] == canon(q_prev)[:, :, None])
            w_next = self.copy_votes(h, nkeys, voters, self.copy_next_query, self.copy_next_gate)
            if self.config.copy_close_ids:  # a vote for an entry's closing token is a vote for EOS
                ends = torch.isin(ids, self._ids(self.config.copy_close_ids, h))
                ids = torch.cat([ids, ids.masked_fill(ends, self.config.eos_token_id)], 1)
                w = torch.cat([w, w_next], -1)
            else:
                w = w + w_next
        ids = ids[:, None, :].expand(B, q_len, ids.shape[1])
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool:
            sel = lambda x: x[logits_to_keep]  # noqa: E731  (n, ...) in row-major order
        elif isinstance(logits_to_keep, int) and logits_to_keep > 0:
            sel = lambda x: x[:, -logits_to_keep:]  # noqa: E731
        elif isinstance(logits_to_keep, int):
            sel = lambda x: x  # noqa: E731
        else:
            raise ValueError("napo_tiny: logits_to_keep must be an int or a boolean mask")
        h, w, ids = sel(h), sel(w), sel(ids)
        logits = self.lm_head(h)
        if detach_lm is not None:  # (B, q) bool, the build's pretrain_list_detach="lm": these positions' LM-head
            # logits carry no gradient (neither to the hidden state nor to the tied head), only their copy votes do
            logits = torch.where(sel(detach_lm)[..., None], logits.detach(), logits)
        logits = logits + torch.zeros_like(logits).scatter_add(-1, ids, w.to(logits.dtype))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=num_items_in_batch, shift_labels=shift_labels, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


AutoConfig.register(TinyCopyConfig.model_type, TinyCopyConfig)
AutoModelForCausalLM.register(TinyCopyConfig, TinyCopyForCausalLM)
