"""minibert's BERT for Hugging Face `transformers` (shipped in every `minibert export hf` folder).

Load with `AutoModel.from_pretrained(folder, trust_remote_code=True)` (or `AutoModelForMaskedLM`,
`AutoModelForPreTraining`). This file needs only torch and transformers: it is the d2l.ai BERT
written plainly over padded (B, T) batches, independently of minibert's unpadded training code.

Why not `BertModel`: the book's encoder has no LayerNorm on the embeddings (BERT always has one),
and the `pre` variant normalises before each sublayer with one final LayerNorm. Everything else is
BERT's shape: token + segment + learned position embeddings; blocks of multi-head self-attention
(W_q, W_k, W_v stacked as one `qkv` Linear) and a ReLU FFN, each with dropout and a residual;
the MLM head Linear-ReLU-LayerNorm-Linear on every position; the NSP head Linear-Tanh-Linear on <cls>.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.utils import ModelOutput


class MinibertConfig(PretrainedConfig):
    model_type = "minibert"

    def __init__(self, vocab_size: int = 20256, hidden_size: int = 128, num_hidden_layers: int = 2,
                 num_attention_heads: int = 2, intermediate_size: int = 256, max_position_embeddings: int = 64,
                 dropout: float = 0.2, norm: str = "post", pad_token_id: int = 0, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.intermediate_size, self.max_position_embeddings = intermediate_size, max_position_embeddings
        self.dropout, self.norm = dropout, norm
        kwargs.setdefault("tie_word_embeddings", False)  # the book's MLM decoder is its own Linear
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class MinibertLayer(nn.Module):
    def __init__(self, cfg: MinibertConfig):
        super().__init__()
        H = cfg.hidden_size
        self.heads, self.pre = cfg.num_attention_heads, cfg.norm == "pre"
        self.qkv = nn.Linear(H, 3 * H)  # output features: [q | k | v], each head-major
        self.out = nn.Linear(H, H)
        self.norm1 = nn.LayerNorm(H)
        self.ffn1 = nn.Linear(H, cfg.intermediate_size)
        self.ffn2 = nn.Linear(cfg.intermediate_size, H)
        self.norm2 = nn.LayerNorm(H)
        self.drop = nn.Dropout(cfg.dropout)

    def attend(self, x: Tensor, keep: Tensor) -> Tensor:
        B, T, H = x.shape
        q, k, v = (t.view(B, T, self.heads, H // self.heads).transpose(1, 2)  # (B, h, T, dh)
                   for t in self.qkv(x).split(H, dim=-1))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                             dropout_p=self.drop.p if self.training else 0.0)
        return self.out(ctx.transpose(1, 2).reshape(B, T, H))  # (B, T, H)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        ffn = lambda y: self.ffn2(F.relu(self.ffn1(y)))  # noqa: E731
        if self.pre:
            x = x + self.drop(self.attend(self.norm1(x), keep))
            return x + self.drop(ffn(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attend(x, keep)))
        return self.norm2(x + self.drop(ffn(x)))


class MinibertPreTrainedModel(PreTrainedModel):
    config_class = MinibertConfig
    base_model_prefix = "minibert"

    def _init_weights(self, module: nn.Module) -> None:  # only for weights a checkpoint lacks
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, MinibertModel):
            nn.init.normal_(module.pos_embedding, std=0.02)


class MinibertModel(MinibertPreTrainedModel):
    """The encoder: (B, T) ids -> last_hidden_state (B, T, H)."""

    def __init__(self, config: MinibertConfig):
        super().__init__(config)
        H = config.hidden_size
        self.token_embedding = nn.Embedding(config.vocab_size, H)
        self.segment_embedding = nn.Embedding(2, H)
        self.pos_embedding = nn.Parameter(torch.zeros(1, config.max_position_embeddings, H))
        self.blocks = nn.ModuleList(MinibertLayer(config) for _ in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(H) if config.norm == "pre" else nn.Identity()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_embedding

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, **kwargs) -> BaseModelOutput:
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}; truncate the input")
        segments = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        keep = mask.bool().view(B, 1, 1, T)  # pad keys masked out for every query
        x = self.token_embedding(input_ids) + self.segment_embedding(segments) + self.pos_embedding[:, :T]
        for block in self.blocks:
            x = block(x, keep)
        return BaseModelOutput(last_hidden_state=self.final_norm(x))  # (B, T, H)


class MinibertForMaskedLM(MinibertPreTrainedModel):
    def __init__(self, config: MinibertConfig):
        super().__init__(config)
        H = config.hidden_size
        self.minibert = MinibertModel(config)
        self.mlm = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.LayerNorm(H), nn.Linear(H, config.vocab_size))
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.mlm[-1]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, labels: Tensor | None = None, **kwargs) -> MaskedLMOutput:
        hidden = self.minibert(input_ids, attention_mask, token_type_ids).last_hidden_state
        logits = self.mlm(hidden)  # (B, T, V)
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=None)


@dataclass
class MinibertForPreTrainingOutput(ModelOutput):
    prediction_logits: Tensor | None = None  # (B, T, V)
    seq_relationship_logits: Tensor | None = None  # (B, 2): NSP, index 1 = "b follows a"
    last_hidden_state: Tensor | None = None  # (B, T, H)


class MinibertForPreTraining(MinibertForMaskedLM):
    """Encoder + MLM head + NSP head, as pretrained."""

    def __init__(self, config: MinibertConfig):
        super().__init__(config)
        H = config.hidden_size
        self.nsp_hidden = nn.Sequential(nn.Linear(H, H), nn.Tanh())
        self.nsp = nn.Linear(H, 2)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, **kwargs) -> MinibertForPreTrainingOutput:
        hidden = self.minibert(input_ids, attention_mask, token_type_ids).last_hidden_state
        return MinibertForPreTrainingOutput(prediction_logits=self.mlm(hidden),
                                            seq_relationship_logits=self.nsp(self.nsp_hidden(hidden[:, 0])),
                                            last_hidden_state=hidden)
