"""FARMER's autoregressive prior over the flow's latent tokens (docs/farmer.md §3, §4).

Each latent token z_i (D channels) splits into informative channels z_i[:d_I] and redundant
channels z_i[d_I:]. A causal transformer reads [class token, z_0^I, ..., z_{N-1}^I]:
    p(z | y) = prod_i GMM(z_i^I; theta(y, z_<i^I)) * prod_i GMM(z_i^R; phi(y, z^I)),
where output i (i < N) gives token i's mixture and output N, after every informative token,
gives the one mixture shared by the redundant channels of all tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from einops import rearrange
from torch import nn

from .causal_transformer import Transformer
from .embeddings import LabelEmbedder, sincos_pos_embed_2d
from .farmer_flow import check_labels
from .farmer_sizes import FarmerArgs
from .mixture import DiagonalMixture, guided_resample


@dataclass(frozen=True)
class PriorMixtures:
    """tokens: batch (B, N), dim d_I; redundant: batch (B, 1), dim d_R, shared by all tokens, or None."""

    tokens: DiagonalMixture
    redundant: Optional[DiagonalMixture]


class FarmerPrior(nn.Module):
    """log_prob(z (B, N, D), y (B,)) -> (B,) nats; sample(labels, ...) -> z (B, N, D)."""

    def __init__(self, args: FarmerArgs):
        super().__init__()
        self.args = args
        width, k = args.prior_width, args.mixture_components
        self.null_class = args.num_classes
        self.label = LabelEmbedder(args.num_classes, width)  # the class token; row num_classes = null
        self.embed = nn.Linear(args.informative_channels, width)
        self.register_buffer("pos", sincos_pos_embed_2d(width, args.grid), persistent=False)
        self.transformer = Transformer(width, args.prior_depth, args.prior_heads, args.prior_mlp_hidden, causal=True)
        self.token_head = nn.Linear(width, DiagonalMixture.num_params(k, args.informative_channels))
        self.redundant_head = (nn.Linear(width, DiagonalMixture.num_params(k, args.redundant_channels))
                               if args.redundant_channels > 0 else None)

    @property
    def input_tokens(self) -> int:
        """Informative tokens fed after the class token: N with a redundant group, else N - 1."""
        n = self.args.num_tokens
        return n if self.redundant_head is not None else n - 1

    def _embed(self, informative: torch.Tensor, start: int) -> torch.Tensor:
        """Informative channels (B, L, d_I) of tokens start.. -> transformer inputs (B, L, W)."""
        return self.embed(informative) + self.pos[start:start + informative.shape[1]].to(informative.dtype)

    def _mixture(self, head: nn.Linear, hidden: torch.Tensor, dim: int) -> DiagonalMixture:
        raw = head(hidden)
        raw = raw.to(torch.promote_types(raw.dtype, torch.float32))  # densities in >= fp32 under autocast
        return DiagonalMixture.from_params(raw, self.args.mixture_components, dim)

    def _check(self, z: torch.Tensor, y: torch.Tensor) -> None:
        want = (self.args.num_tokens, self.args.token_dim)
        if z.dim() != 3 or tuple(z.shape[1:]) != want:
            raise ValueError(f"FarmerPrior: z must be (B, {want[0]}, {want[1]}), got {tuple(z.shape)}")
        check_labels(y, z.shape[0], "FarmerPrior")

    def mixtures(self, z: torch.Tensor, y: torch.Tensor) -> PriorMixtures:
        """All mixtures of z's factorisation in one causal pass (teacher forcing)."""
        self._check(z, y)
        d_i = self.args.informative_channels
        inputs = self._embed(z[:, :self.input_tokens, :d_i], start=0)
        sequence = torch.cat([rearrange(self.label(y), "b w -> b 1 w").to(inputs.dtype), inputs], dim=1)
        hidden = self.transformer(sequence)  # (B, input_tokens + 1, W)
        tokens = self._mixture(self.token_head, hidden[:, :self.args.num_tokens], d_i)
        redundant = None
        if self.redundant_head is not None:
            redundant = self._mixture(self.redundant_head, hidden[:, -1:], self.args.redundant_channels)
        return PriorMixtures(tokens, redundant)

    def log_prob(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p(z | y) (B,) in nats: informative tokens one by one + the shared redundant mixture."""
        mix = self.mixtures(z, y)
        d_i = self.args.informative_channels
        acc = mix.tokens.means.dtype
        log_p = mix.tokens.log_prob(z[..., :d_i].to(acc)).sum(dim=1)
        if mix.redundant is not None:
            log_p = log_p + mix.redundant.log_prob(z[..., d_i:].to(acc)).sum(dim=1)
        return log_p

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, cfg_scale: float = 1.0, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None, candidates: Optional[int] = None) -> torch.Tensor:
        """z (B, N, D) token by token with a KV cache; cfg_scale != 1 runs the null class beside (2B rows)."""
        a = self.args
        check_labels(labels, labels.shape[0], "FarmerPrior.sample")
        batch, guided = labels.shape[0], cfg_scale != 1.0
        rows = torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels
        candidates = a.cfg_candidates if candidates is None else candidates

        def draw(mix: DiagonalMixture) -> torch.Tensor:
            if not guided:
                return mix.sample(generator, temperature)
            return guided_resample(mix[:batch], mix[batch:], cfg_scale, candidates, generator, temperature)

        def step(hidden_rows: torch.Tensor) -> torch.Tensor:  # rows of the fed token -> last hidden state
            return self.transformer(hidden_rows, cache)[:, -1]

        cache = self.transformer.new_cache()
        dtype = self.embed.weight.dtype
        hidden = step(rearrange(self.label(rows), "b w -> b 1 w"))
        informative = []
        for i in range(a.num_tokens):
            token = draw(self._mixture(self.token_head, hidden, a.informative_channels)).to(dtype)  # (B, d_I)
            informative.append(token)
            if i < self.input_tokens:
                fed = torch.cat([token, token]) if guided else token
                hidden = step(self._embed(rearrange(fed, "b d -> b 1 d"), start=i))
        z = torch.stack(informative, dim=1)  # (B, N, d_I)
        if self.redundant_head is None:
            return z
        shared = self._mixture(self.redundant_head, rearrange(hidden, "b w -> b 1 w"), a.redundant_channels)
        redundant = draw(shared.expand(rows.shape[0], a.num_tokens)).to(dtype)  # (B, N, d_R)
        return torch.cat([z, redundant], dim=-1)
