"""The fast rollout engine: a preallocated KV cache, one slot per sequence, and a Qwen2/Llama forward written for it.

Design:
- KV cache: per layer K and V of [slots, kv_heads, max_len, head_dim] in the model's dtype, max_len =
  max_prompt_len + max_new_tokens (`max_prompt_len` is required; a longer prompt is refused). A sequence owns
  one slot until it finishes or is evicted, and takes the lowest free one. Before each decode, sequences in the
  highest slots move (their K/V, next token and context with them) into free slots below them (`_pack`), so the
  active slots stay packed at the front: a long tail left on slot 31 by finished neighbours decodes one row, not
  32, as the simulator charges a decode step for its active sequences. An evicted sequence's slot is simply free
  again; resumed, it takes a free slot like an admission.
- A step decodes first, then prefills: the decode forward runs over the first b slots, b covering the highest slot
  active since an earlier step: on CUDA the smallest bucket that does (powers of two below `slots`, and `slots`:
  one captured graph each), elsewhere exactly that slot's index + 1 (no graph to reuse: padding rows would only
  add work the simulator does not charge, as it charges a step for its active sequences); the
  prefill forward runs over the sequences admitted or resumed since the last step (a prompt, or a resumed
  sequence's prompt and tokens), right-padded into one batch (causal attention among its own tokens, so no sequence
  sees padding), writing each one's K/V at positions 0..len-1 of its slot. One `sample` call then draws a token
  for every active sequence.
- Slots in the decode bucket that hold no sequence (or one admitted this step) compute garbage: it writes K/V at
  the slot's position (0 for a free slot) and its logits are dropped. That is harmless because a sequence attends
  only to positions 0..pos, every one of which it wrote itself (prefill, or its own decode step) after any garbage
  landed there: the prefill runs after the decode within a step, and a decode writes position pos before reading it.
- The forward reads the transformers model's own parameters (no copies), so a weight channel that `.copy_`s new
  weights into `model.parameters()` changes what the next step computes, and `weights_loaded` only bumps the
  version; the KV cache of earlier tokens is kept.
- On CUDA the decode forward of each bucket (token ids and positions in, logits out) is captured as a CUDA graph
  the first time that bucket is used and replayed after; its shapes are static (attention over all max_len
  positions, masked). Elsewhere, or with `cuda_graphs=False`, it runs eagerly with attention cut to the longest
  context (rounded up to `SPAN_ROUND`).
- One host sync per step: the sampled tokens and log-probs come back to the host to record them and detect EOS.

The math reproduces transformers' (v5) transformers/models/qwen2/modeling_qwen2.py and
transformers/models/llama/modeling_llama.py (RMSNorm, RotaryEmbedding with the default rope type,
apply_rotary_pos_emb, Attention with grouped KV heads, MLP, DecoderLayer, ForCausalLM), and the RoPE parameters as
transformers/modeling_rope_utils.py standardizes them (`config.rope_parameters["rope_type"]`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from real.engine import Finished, Generation, Sampling, check_admission, check_resumption, sample

FAMILIES = ("qwen2", "llama")
SPAN_ROUND = 32  # eager decode attends to the longest context rounded up to this many positions


def check_model(config) -> None:
    """ValueError unless the forward below computes what transformers computes for this config."""
    if config.model_type not in FAMILIES:
        raise ValueError(f"FastEngine: model type '{config.model_type}' is not supported (only {', '.join(FAMILIES)}); "
                         f"use real.engine: reference")
    if getattr(config, "use_sliding_window", False):
        raise ValueError("FastEngine: sliding-window attention (use_sliding_window: true) is not supported")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"FastEngine: rope type '{rope_type}' is not supported (only the default RoPE)")


def buckets(slots: int) -> list[int]:
    """Decode batch sizes: 1, 2, 4, ... below `slots`, then `slots`."""
    out = [1 << i for i in range(slots.bit_length()) if 1 << i < slots]
    return out + [slots]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb for one of q, k: x [N, T, heads, d], cos and sin broadcastable to it."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class FastEngine:
    def __init__(self, model, slots: int, sampling: Sampling, version: int, generator: torch.Generator | None = None,
                 max_prompt_len: int | None = None, cuda_graphs: bool = True):
        """`max_prompt_len` is required: it sizes the KV cache (with `sampling.max_new_tokens`)."""
        cfg = model.config
        check_model(cfg)
        if max_prompt_len is None or max_prompt_len < 1:
            raise ValueError(f"FastEngine: max_prompt_len must be a positive int (it sizes the KV cache), "
                             f"got {max_prompt_len}")
        self.model, self.slots, self.sampling, self.version, self.generator = model, slots, sampling, version, generator
        self.max_prompt_len = max_prompt_len
        self.max_len = max_prompt_len + sampling.max_new_tokens
        w = model.model.embed_tokens.weight
        self.device, self.dtype = w.device, w.dtype
        self.layers = list(model.model.layers)
        attn = self.layers[0].self_attn
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.scale, self.eps = attn.head_dim, attn.scaling, cfg.rms_norm_eps
        self.buckets = buckets(slots)
        self.graphs = cuda_graphs and self.device.type == "cuda"
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}   # bucket -> graph, its logits
        with torch.inference_mode():
            shape = (slots, self.kv_heads, self.max_len, self.head_dim)
            self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]  # [S, kvh, L, d]
            self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]  # [S, kvh, L, d]
            self.tok = torch.zeros(slots, dtype=torch.long, device=self.device)   # [S] each slot's next input token
            self.pos = torch.zeros(slots, dtype=torch.long, device=self.device)   # [S] ... and its position
            self.arange = torch.arange(max(slots, self.max_len), device=self.device)
            # Qwen2RotaryEmbedding.forward: freqs = position * inv_freq in float32, cos/sin of [freqs, freqs] times
            # attention_scaling, cast to the model's dtype. inv_freq is the module's buffer (transformers computed
            # it from rope_parameters["rope_theta"]; a bfloat16 model holds it rounded to bfloat16, as used there).
            rotary = model.model.rotary_emb
            freqs = self.arange[:self.max_len, None].float() * rotary.inv_freq.to(self.device, torch.float)
            emb = torch.cat((freqs, freqs), dim=-1)                                # [L, d]
            self.cos = (emb.cos() * rotary.attention_scaling).to(self.dtype)       # [L, d]
            self.sin = (emb.sin() * rotary.attention_scaling).to(self.dtype)       # [L, d]
        self.seqs: list[Generation | None] = [None] * slots   # by slot
        self.ctx = [0] * slots                          # by slot: tokens in its cache (0 when free)
        self.new: list[int] = []                        # slots admitted or resumed since the last step, not prefilled

    def active(self) -> int:
        return sum(s is not None for s in self.seqs)

    def free_slots(self) -> int:
        return self.slots - self.active()

    def weights_loaded(self, version: int) -> None:
        # The forward reads model's parameters themselves, and captured graphs their storage, which an in-place
        # copy keeps: nothing to refresh.
        self.version = version

    def _held(self) -> set[int]:
        return {s.seq_id for s in self.seqs if s is not None}

    def admit(self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> None:
        check_admission(seq_ids, prompts, self.free_slots(), self._held(), self.max_prompt_len)
        self._take([Generation(sid, p) for sid, p in zip(seq_ids, prompts)])

    def resume(self, generations: Sequence[Generation]) -> None:
        check_resumption(generations, self.free_slots(), self._held(), self.sampling, self.max_prompt_len)
        self._take(generations)

    def _take(self, generations: Sequence[Generation]) -> None:
        """Into the lowest free slots, prefilled at the next step."""
        free = [i for i, s in enumerate(self.seqs) if s is None]
        for slot, gen in zip(free, generations):
            self.seqs[slot] = gen
            self.new.append(slot)

    def evict(self, seq_id: int) -> Generation:
        slot = next((i for i, s in enumerate(self.seqs) if s is not None and s.seq_id == seq_id), None)
        if slot is None:
            raise ValueError(f"evict: sequence {seq_id} is not in the engine")
        if slot in self.new:   # admitted or resumed since the last step: nothing of it is cached yet
            self.new.remove(slot)
        # The slot's K/V stay as garbage: whoever takes the slot next writes each position before attending to it.
        gen, self.seqs[slot], self.ctx[slot] = self.seqs[slot], None, 0
        return gen

    def _h2d(self, values: list[int]) -> torch.Tensor:
        """A long tensor on the device, copied without blocking the host (pinned memory on CUDA)."""
        host = torch.tensor(values, dtype=torch.long, pin_memory=self.device.type == "cuda")
        return host.to(self.device, non_blocking=True)

    def _norm(self, x: torch.Tensor, norm) -> torch.Tensor:
        """Qwen2RMSNorm / LlamaRMSNorm: normalize in float32, cast back, then scale."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return norm.weight * h.to(x.dtype)

    def _forward(self, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Final-normed hidden states [N, T, hidden] of tokens ids [N, T]; cos, sin broadcast to [N, T, heads, d];
        attend(layer, q [N, T, H, d], k, v [N, T, kvh, d]) stores k, v in the cache and returns [N, T, H * d]."""
        x = F.embedding(ids, self.model.model.embed_tokens.weight)                 # [N, T, hidden]
        split = (*ids.shape, -1, self.head_dim)
        for i, layer in enumerate(self.layers):
            a, m = layer.self_attn, layer.mlp
            h = self._norm(x, layer.input_layernorm)
            q = _rope(F.linear(h, a.q_proj.weight, a.q_proj.bias).view(split), cos, sin)    # [N, T, H, d]
            k = _rope(F.linear(h, a.k_proj.weight, a.k_proj.bias).view(split), cos, sin)    # [N, T, kvh, d]
            v = F.linear(h, a.v_proj.weight, a.v_proj.bias).view(split)                     # [N, T, kvh, d]
            x = x + F.linear(attend(i, q, k, v), a.o_proj.weight, a.o_proj.bias)
            h = self._norm(x, layer.post_attention_layernorm)
            gate = m.act_fn(F.linear(h, m.gate_proj.weight, m.gate_proj.bias))
            x = x + F.linear(gate * F.linear(h, m.up_proj.weight, m.up_proj.bias), m.down_proj.weight,
                             m.down_proj.bias)
        return self._norm(x, self.model.model.norm)

    def _lm_head(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.model.lm_head.weight, self.model.lm_head.bias)   # tied or not: the module's weight

    def _decode(self, b: int, span: int) -> torch.Tensor:
        """Logits [b, V] of slots 0..b-1 fed self.tok at self.pos, attending to cache positions 0..pos (< span).
        Static shapes and no host reads: this is what a CUDA graph captures."""
        pos, rows = self.pos[:b], self.arange[:b]                                  # [b], [b]
        cos = self.cos.index_select(0, pos)[:, None, None]                         # [b, 1, 1, d]
        sin = self.sin.index_select(0, pos)[:, None, None]
        mask = (self.arange[:span] <= pos[:, None])[:, None, None]                 # [b, 1, 1, span]
        group = self.heads // self.kv_heads

        def attend(i, q, k, v):
            kc, vc = self.k[i], self.v[i]                                          # [S, kvh, L, d]
            kc[rows, :, pos] = k[:, 0]                                             # index_put: [b, kvh, d]
            vc[rows, :, pos] = v[:, 0]
            # GQA without repeating K/V: the `group` query heads of a KV head (heads h = kv * group + r, as
            # repeat_kv orders them) form the query length of a [b, kvh] attention.
            q = q.view(b, self.kv_heads, group, self.head_dim)                     # [b, kvh, g, d]
            o = F.scaled_dot_product_attention(q, kc[:b, :, :span], vc[:b, :, :span], attn_mask=mask,
                                               scale=self.scale)                   # [b, kvh, g, d]
            return o.reshape(b, 1, -1)                                             # [b, 1, H * d]

        h = self._forward(self.tok[:b, None], cos, sin, attend)                    # [b, 1, hidden]
        return self._lm_head(h[:, 0])                                              # [b, V]

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """A CUDA graph of bucket b's decode (over all max_len positions), warmed up on a side stream first (lazy
        initializations must not happen during capture), and its static logits [b, V]."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._decode(b, self.max_len)   # writes the same K/V the replay then writes
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._decode(b, self.max_len)
        return graph, logits

    def _decode_logits(self, b: int) -> torch.Tensor:
        if not self.graphs:
            span = -(-(max(self.ctx[:b]) + 1) // SPAN_ROUND) * SPAN_ROUND
            return self._decode(b, min(span, self.max_len))
        if b not in self._captured:
            self._captured[b] = self._capture(b)
        graph, logits = self._captured[b]
        graph.replay()
        return logits

    def _prefill(self, slots: list[int]) -> torch.Tensor:
        """Prefill the contexts (prompt and tokens so far) of `slots` in one right-padded batch; the logits [n, V] at
        each one's last token."""
        prompts = [self.seqs[s].context() for s in slots]
        n, width = len(prompts), max(map(len, prompts))
        ids = self._h2d([t for p in prompts for t in (*p, *[0] * (width - len(p)))]).view(n, width)   # [n, W]
        dest = self._h2d(slots)                                                    # [n]
        group = self.heads // self.kv_heads

        def attend(i, q, k, v):
            k, v = k.transpose(1, 2), v.transpose(1, 2)                            # [n, kvh, W, d]
            self.k[i][dest, :, :width] = k
            self.v[i][dest, :, :width] = v
            # Causal within each prompt; right padding only follows a prompt's tokens, so they never see it.
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(group, dim=1),
                                               v.repeat_interleave(group, dim=1), is_causal=True,
                                               scale=self.scale)                   # [n, H, W, d]
            return o.transpose(1, 2).reshape(n, width, -1)                         # [n, W, H * d]

        h = self._forward(ids, self.cos[None, :width, None], self.sin[None, :width, None], attend)   # [n, W, hidden]
        last = self._h2d([len(p) - 1 for p in prompts])                            # [n]
        return self._lm_head(h[self.arange[:n], last])                             # [n, V]

    def _pack(self, new: list[int]) -> list[int]:
        """Put the d sequences to decode in slots 0..d-1: each one above moves into a slot below d that none of them
        holds (K/V of its cached positions, next input token, context). A sequence admitted since the last step
        (`new`: its slots, not prefilled, nothing cached) that held that slot takes the mover's old one instead.
        Returns `new` with such slots replaced."""
        fresh = set(new)
        decoded = [i for i, s in enumerate(self.seqs) if s is not None and i not in fresh]
        d = len(decoded)
        movers = [i for i in decoded if i >= d]
        if not movers:
            return new
        held = set(decoded)
        holes = [i for i in range(d) if i not in held]   # free, or a new sequence's: as many as movers
        src, dst = self._h2d(movers), self._h2d(holes)
        span = max(self.ctx[i] for i in movers)                                    # cached positions 0..span-1
        for k, v in zip(self.k, self.v):
            k[dst, :, :span] = k[src, :, :span]                                    # [m, kvh, span, d]
            v[dst, :, :span] = v[src, :, :span]
        self.tok[dst] = self.tok[src]
        slot_of_new = {i: i for i in new}
        for a, b in zip(movers, holes):
            if b in fresh:
                slot_of_new[b] = a
            self.seqs[a], self.seqs[b] = self.seqs[b], self.seqs[a]
            self.ctx[a], self.ctx[b] = self.ctx[b], self.ctx[a]
        return [slot_of_new[i] for i in new]

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        new, self.new = self._pack(self.new), []
        fresh = set(new)
        old = [i for i, s in enumerate(self.seqs) if s is not None and i not in fresh]   # decoded, in slot order
        logits = []
        if old:   # decode before prefill: garbage rows of the bucket may write into a slot being prefilled
            b = next(k for k in self.buckets if k > old[-1]) if self.graphs else old[-1] + 1
            self.pos[:b].copy_(self._h2d(self.ctx[:b]))
            logits.append(self._decode_logits(b)[self._h2d(old)])                 # [len(old), V]
        if new:
            logits.append(self._prefill(new))                                      # [len(new), V]
        order = old + new
        if not order:
            return []
        tok, logp = sample(torch.cat(logits), self.sampling, self.generator)       # [a], [a]
        self.tok[self._h2d(order)] = tok
        # the one host sync of the step: tokens (exact in float64) and log-probs together
        toks, logps = torch.stack((tok.double(), logp.double())).tolist()
        finished = []
        for slot, t, lp in zip(order, toks, logps):
            seq = self.seqs[slot]
            self.ctx[slot] = len(seq.prompt) + len(seq.tokens) if slot in fresh else self.ctx[slot] + 1
            if (done := seq.add(int(t), lp, self.version, self.sampling)) is not None:
                finished.append(done)
                self.seqs[slot], self.ctx[slot] = None, 0
        return finished
