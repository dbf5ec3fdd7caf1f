"""Language Module (LM), paper §3.3, eq. 2-8:  {r_t}, {{f_k,t}} = LM({w_t}).

    e_t = WE(w_t)                      a learned word embedding
    h_t = SRU(e_1..e_t)                 a multi-layer SRU (eq. 2-6; or an LSTM, see notebook 10)
    r_t = [e_t, h_t]                    "an enriched language representation up to word t"
    f_k,t = σ(W_fk r_t + b_fk)          K dynamic filters, one per k (eq. 7)

Each filter has one weight per channel of [I_N; LOC], so the Synthesis Module can use it as a
1x1 convolution over the visual map (the idea of Li et al. [5], applied at every word).
Taught in notebook 04.
"""
from __future__ import annotations

import torch
from torch import nn

from dmn_lib.config import DMNConfig
from dmn_lib.data.vocab import PAD
from dmn_lib.models.recurrent import make_rnn


class LanguageModule(nn.Module):
    def __init__(self, config: DMNConfig, filter_channels: int):
        super().__init__()
        self.concat_embeddings = config.concat_embeddings
        self.num_filters = config.num_filters
        self.filter_channels = filter_channels  # channels of [I_N; LOC]
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=PAD)
        self.rnn = make_rnn(config.rnn, config.embedding_dim, config.lm_hidden, config.lm_layers, config.sru_activation)
        # r_t = [e_t, h_t], or h_t alone for the "only h_t" ablation (Table 1, row 2).
        self.r_size = config.lm_hidden + (config.embedding_dim if config.concat_embeddings else 0)
        self.filters = (
            nn.Linear(self.r_size, config.num_filters * filter_channels) if config.dynamic_filters else None
        )

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens B x T -> r: B x T x r_size, filters: B x T x K x filter_channels (or None)."""
        e = self.embedding(tokens)  # B x T x E
        h = self.rnn(e.transpose(0, 1)).transpose(0, 1)  # the RNNs run time-major: T x B x E
        r = torch.cat([e, h], dim=-1) if self.concat_embeddings else h
        if self.filters is None:
            return r, None
        batch, length, _ = r.shape
        f = torch.sigmoid(self.filters(r))  # eq. 7
        return r, f.view(batch, length, self.num_filters, self.filter_channels)
