#!/usr/bin/env python3
"""The same MoE language model as a SwiftMoE config, in plain PyTorch (eager, one process, all
cores), trained on random bytes: the peer of launch/bench-peer.sh.

The model follows SwiftMoE's GPT-2 block: learned positions, pre-LayerNorm, causal attention
(fused: F.scaled_dot_product_attention), every `moe_every`-th FFN a mixture of experts with GELU
(tanh), top-k softmax routing with capacity (tokens over an expert's capacity are dropped), a
load-balance loss, tied embeddings, AdamW. The experts run the way a PyTorch user writes them:
per expert, gather its tokens, two Linear layers, scatter-add the weighted result.

Prints one JSON object: tokens/s in fp32 and with bf16 autocast, and which is stronger.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Expert(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class MoE(nn.Module):
    def __init__(self, width, hidden, experts, top_k, capacity_factor):
        super().__init__()
        self.router = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList(Expert(width, hidden) for _ in range(experts))
        self.top_k, self.capacity_factor = top_k, capacity_factor

    def forward(self, x):
        tokens, width = x.shape
        probabilities = F.softmax(self.router(x).float(), dim=-1)
        weights, chosen = probabilities.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        experts = len(self.experts)
        capacity = max(4, math.ceil(self.capacity_factor * tokens * self.top_k / experts))
        # Switch/GShard balance loss: E * sum_e (fraction routed to e) * (mean probability of e).
        fraction = F.one_hot(chosen, experts).float().sum(dim=(0, 1)) / (tokens * self.top_k)
        balance = experts * (fraction * probabilities.mean(dim=0)).sum()
        out = torch.zeros_like(x)
        flat_expert, flat_weight = chosen.reshape(-1), weights.reshape(-1)
        flat_token = torch.arange(tokens, device=x.device).repeat_interleave(self.top_k)
        for e, expert in enumerate(self.experts):
            slots = (flat_expert == e).nonzero(as_tuple=True)[0][:capacity]
            if slots.numel() == 0:
                continue
            rows = flat_token[slots]
            y = expert(x[rows]) * flat_weight[slots].unsqueeze(-1).to(x.dtype)
            out.index_add_(0, rows, y.to(out.dtype))
        return out, balance


class Block(nn.Module):
    def __init__(self, width, heads, hidden, moe):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.projection = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.heads = heads
        self.ffn = moe if moe is not None else Expert(width, hidden)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.projection(attended.transpose(1, 2).reshape(batch, length, width))
        normed = self.norm2(x).view(batch * length, width)
        if isinstance(self.ffn, MoE):
            y, balance = self.ffn(normed)
        else:
            y, balance = self.ffn(normed), x.new_zeros(())
        return x + y.view(batch, length, width), balance


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        width = c["width"]
        self.tokens = nn.Embedding(c["vocab"], width)
        self.positions = nn.Embedding(c["context"], width)
        blocks = []
        for layer in range(c["layers"]):
            is_moe = c["moe_every"] > 0 and (layer + 1) % c["moe_every"] == 0
            moe = MoE(width, c["ffn_hidden"], c["experts"], c["top_k"], c["capacity_factor"]) if is_moe else None
            blocks.append(Block(width, c["heads"], c["ffn_hidden"], moe))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(width)
        self.balance_weight = c["balance_loss"]

    def forward(self, ids, targets):
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        balance = 0.0
        for block in self.blocks:
            x, b = block(x)
            balance = balance + b
        logits = self.norm(x) @ self.tokens.weight.t()   # tied head
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return loss + self.balance_weight * balance


def tokens_per_second(c, bf16, steps, warmup):
    torch.manual_seed(0)
    model = Model(c)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    batch, context = c["batch"], c["context"]

    def step():
        ids = torch.randint(0, c["vocab"], (batch, context + 1), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * context / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="JSON object of the model (see launch/bench-peer.sh)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    config = json.loads(args.model)
    torch.set_num_threads(args.threads)
    result = {"torch": torch.__version__, "threads": args.threads, "global_batch_tokens": config["batch"] * config["context"]}
    for name, bf16 in (("fp32", False), ("bf16_autocast", True)):
        result[name] = round(tokens_per_second(config, bf16, args.steps, args.warmup))
    result["peer"] = max(("fp32", "bf16_autocast"), key=lambda name: result[name])
    result["tokens_per_sec"] = result[result["peer"]]
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
