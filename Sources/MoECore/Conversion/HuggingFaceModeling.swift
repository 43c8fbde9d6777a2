/// The PyTorch model that `moe export --format hf` writes as `modeling_swiftmoe.py`: the same
/// decoder as GPTModel (pre-norm blocks, learned positions, GELU (tanh) FFNs, tied or separate
/// head) with dropless top-k routing, using SwiftMoE's tensor names and [in, out] layouts.
enum HuggingFaceModeling {
    static let source = #"""
"""SwiftMoE's GPT-style mixture-of-experts decoder, for Hugging Face transformers.

Written by `moe export --format hf`. Weights keep SwiftMoE's names and layouts: every linear
weight is [in, out] (y = x @ W + b). MoE layers route each token to the top_k experts of
softmax(x @ router) (top_k = config.experts_per_token), weighted by those probabilities (renormalised over the k when
config.renormalize), with no capacity limit.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class SwiftMoEConfig(PretrainedConfig):
    model_type = "swiftmoe"
    # The names transformers' generation utilities read (its cache setup asks for the layers).
    attribute_map = {"num_hidden_layers": "layers", "hidden_size": "width", "num_attention_heads": "heads",
                     "max_position_embeddings": "context"}

    def __init__(self, vocab_size=256, context=128, width=256, layers=4, heads=4, ffn_hidden=512,
                 tie_embeddings=True, moe_layers=(), experts=8, experts_per_token=2, renormalize=True,
                 layer_norm_epsilon=1e-5, **kwargs):
        self.vocab_size, self.context, self.width = vocab_size, context, width
        self.layers, self.heads, self.ffn_hidden = layers, heads, ffn_hidden
        self.tie_embeddings, self.moe_layers, self.experts = tie_embeddings, list(moe_layers), experts
        self.experts_per_token, self.renormalize = experts_per_token, renormalize
        self.layer_norm_epsilon = layer_norm_epsilon
        kwargs["tie_word_embeddings"] = False  # the head reads the embedding itself when tied
        super().__init__(**kwargs)


class Linear(nn.Module):
    def __init__(self, inputs, outputs):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(inputs, outputs))
        self.bias = nn.Parameter(torch.zeros(outputs))

    def forward(self, x):
        return x @ self.weight + self.bias


class LayerNorm(nn.Module):
    def __init__(self, width, epsilon):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.epsilon = epsilon

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.gain, self.bias, self.epsilon)


class FeedForward(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.up, self.down = Linear(width, hidden), Linear(hidden, width)

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.qkv, self.projection, self.heads = Linear(width, 3 * width), Linear(width, width), heads

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(width, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.projection(y.transpose(1, 2).reshape(batch, length, width))


class MixtureOfExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.router = nn.Parameter(torch.zeros(config.width, config.experts))
        self.experts = nn.ModuleList(FeedForward(config.width, config.ffn_hidden) for _ in range(config.experts))
        self.top_k, self.renormalize = config.experts_per_token, config.renormalize

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        probabilities = torch.softmax((rows @ self.router).float(), dim=-1)
        weights, chosen = probabilities.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(rows)
        for expert_index, expert in enumerate(self.experts):
            token, choice = (chosen == expert_index).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, weights[token, choice, None].to(rows.dtype) * expert(rows[token]))
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attention_norm = LayerNorm(config.width, config.layer_norm_epsilon)
        self.attention = Attention(config.width, config.heads)
        self.ffn_norm = LayerNorm(config.width, config.layer_norm_epsilon)
        if layer in config.moe_layers:
            self.moe = MixtureOfExperts(config)
        else:
            self.ffn = FeedForward(config.width, config.ffn_hidden)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        mlp = self.moe if hasattr(self, "moe") else self.ffn
        return x + mlp(self.ffn_norm(x))


class Embedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(config.vocab_size, config.width))
        self.position = nn.Parameter(torch.zeros(config.context, config.width))


class Head(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.width, config.vocab_size))


class SwiftMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SwiftMoEConfig
    base_model_prefix = "swiftmoe"
    _supports_cache_class = False

    def __init__(self, config):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.layers))
        self.final_norm = LayerNorm(config.width, config.layer_norm_epsilon)
        if not config.tie_embeddings:
            self.head = Head(config)
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from model.safetensors

    def forward(self, input_ids, labels=None, **kwargs):
        length = input_ids.shape[1]
        if length > self.config.context:
            raise ValueError(f"{length} tokens exceed the context of {self.config.context} (absolute positions)")
        x = self.embedding.token[input_ids] + self.embedding.position[:length]
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        logits = x @ (self.embedding.token.T if self.config.tie_embeddings else self.head.weight)
        loss = None
        if labels is not None:  # labels are the inputs; token t predicts token t + 1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids[:, -self.config.context:]}
"""#
}
