"""Builds a tiny random transformers model (no download) and saves it for the import tests.

Usage: make-tiny-hf-model.py KIND OUTPUT_DIR [--bf16] [--shards]

KIND: mixtral, qwen3_moe (an MoE every second block, weights not renormalised), olmoe,
qwen2_moe (a gated shared expert, an MoE every second block), llama (dense), qwen2_moe_biased
(attention biases, which SwiftMoE refuses). The weights are scaled up so the
loss is far from uniform. --bf16 saves BF16 tensors; --shards splits them into several files
with model.safetensors.index.json.
"""
import sys

import torch
import transformers as t

kind, output = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
common = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rope_theta=1000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
moe = dict(num_experts_per_tok=2)
if kind == "mixtral":
    model = t.MixtralForCausalLM(t.MixtralConfig(intermediate_size=48, num_local_experts=4, **moe, **common))
elif kind == "qwen3_moe":
    model = t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=24, num_experts=4, decoder_sparse_step=2,
                                                   norm_topk_prob=False, head_dim=8, **moe, **common))
elif kind == "olmoe":
    model = t.OlmoeForCausalLM(t.OlmoeConfig(intermediate_size=48, num_experts=4, norm_topk_prob=True, **moe, **common))
elif kind == "llama":
    model = t.LlamaForCausalLM(t.LlamaConfig(intermediate_size=48, **common))
elif kind.startswith("qwen2_moe"):
    model = t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=20,
                                                   num_experts=4, decoder_sparse_step=2, norm_topk_prob=True,
                                                   qkv_bias=kind.endswith("biased"), **moe, **common))
else:
    sys.exit(f"unknown kind {kind}")
with torch.no_grad():
    for parameter in model.parameters():
        if parameter.dim() > 1:
            parameter.mul_(5)
if "--bf16" in sys.argv:
    model = model.to(torch.bfloat16)
model.save_pretrained(output, max_shard_size="40KB" if "--shards" in sys.argv else "5GB")
