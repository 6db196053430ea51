"""A TopK sparse autoencoder (Gao et al., "Scaling and evaluating sparse autoencoders", 2024), in plain torch.

    z   = TopK_k(ReLU(W_enc (x - b_pre) + b_enc))          # k active latents per token
    x^  = z W_dec + b_pre                                   # decoder rows kept at unit norm
    loss = nmse(x, x^) + alpha * auxk + lambda * |z|_1

``auxk`` reconstructs the residual x - x^ with the ``aux_k`` largest pre-activations among dead latents (those that
did not fire in the last ``dead_tokens`` tokens), which gives dead latents a gradient. The decoder rows are
renormalised after every step and the gradient component parallel to each row is removed before it. Inputs are
scaled by one scalar so that E||x||^2 = d (the scale is part of the model).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SAEShape:
    d_in: int
    """Input width (the number of selected coordinates)."""
    n_latents: int
    """Dictionary size."""
    k: int
    """Active latents per token."""
    aux_k: int
    """Dead latents used by the AuxK loss."""
    dead_tokens: int
    """A latent that has not fired in this many tokens counts as dead."""

    def __post_init__(self) -> None:
        if not 0 < self.k <= self.n_latents:
            raise ValueError(f"k={self.k} must be in 1..n_latents={self.n_latents}")
        if self.aux_k < 0 or self.dead_tokens <= 0:
            raise ValueError("aux_k must be >= 0 and dead_tokens > 0")


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_j values[..., j] * weight[indices[..., j]]: one embedding bag per row, so neither the forward nor the
    backward pass materialises the [..., k, d] gathered rows."""
    flat_v, flat_i = values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1])
    out = F.embedding_bag(flat_i, weight, per_sample_weights=flat_v.to(weight.dtype), mode="sum")
    return out.reshape(*values.shape[:-1], weight.shape[1])


class TopKSAE(nn.Module):
    def __init__(self, shape: SAEShape, generator: torch.Generator | None = None):
        super().__init__()
        self.shape = shape
        w = torch.randn(shape.n_latents, shape.d_in, generator=generator)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.clone())
        self.encoder = nn.Linear(shape.d_in, shape.n_latents)
        with torch.no_grad():
            self.encoder.weight.copy_(w)  # tied initialisation
            self.encoder.bias.zero_()
        self.b_pre = nn.Parameter(torch.zeros(shape.d_in))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("tokens_since_fired", torch.zeros(shape.n_latents, dtype=torch.long))

    # --- encoding / decoding ---------------------------------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x * self.input_scale - self.b_pre)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), each [..., k]: the top-k ReLU latents of every row."""
        values, indices = self.pre_activations(x).topk(self.shape.k, dim=-1, sorted=False)
        return values.relu(), indices

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sparse decode (a weighted sum of k decoder rows per token), in the scaled input space."""
        return sparse_decode(values, indices, self.W_dec) + self.b_pre

    def dense_codes(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n_latents] with the k active values scattered in place, zeros elsewhere."""
        values, indices = self.encode(x)
        return torch.zeros(*values.shape[:-1], self.shape.n_latents, dtype=values.dtype,
                           device=values.device).scatter_(-1, indices, values)

    # --- training --------------------------------------------------------------------------------------------------
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.shape.dead_tokens

    def loss(self, x: torch.Tensor, aux_alpha: float, l1: float) -> dict[str, torch.Tensor]:
        """Loss terms on a batch [N, d_in]; updates the firing statistics."""
        xs = x * self.input_scale
        pre = self.encoder(xs - self.b_pre)
        values, indices = pre.topk(self.shape.k, dim=-1, sorted=False)
        values = values.relu()
        recon = sparse_decode(values, indices, self.W_dec) + self.b_pre
        variance = (xs - xs.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)
        nmse = (recon - xs).pow(2).sum(dim=-1).mean() / variance

        with torch.no_grad():
            fired = torch.zeros(self.shape.n_latents, dtype=torch.bool, device=x.device)
            fired[indices[values > 0]] = True
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired] = 0

        auxk = torch.zeros((), device=x.device)
        dead = self.dead_mask()
        n_aux = min(self.shape.aux_k, int(dead.sum()))
        if aux_alpha > 0 and n_aux > 0:
            residual = (xs - recon).detach()
            aux_pre = pre.masked_fill(~dead, float("-inf"))
            aux_values, aux_indices = aux_pre.topk(n_aux, dim=-1, sorted=False)
            aux_recon = sparse_decode(aux_values.relu(), aux_indices, self.W_dec)
            res_var = (residual - residual.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)
            auxk = (aux_recon - residual).pow(2).sum(dim=-1).mean() / res_var
        l1_term = values.abs().sum(dim=-1).mean() if l1 > 0 else torch.zeros((), device=x.device)
        total = nmse + aux_alpha * auxk + l1 * l1_term
        return {"loss": total, "nmse": nmse, "auxk": auxk, "l1": l1_term}

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Project each decoder row's gradient onto the row's tangent space (keeps ||row|| = 1 to first order)."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fraction_of_variance_unexplained(self, x: torch.Tensor) -> float:
        xs = x * self.input_scale
        values, indices = self.encode(x)
        recon = self.decode(values, indices)
        return float((recon - xs).pow(2).sum() / (xs - xs.mean(dim=0)).pow(2).sum().clamp_min(1e-12))


@dataclass
class TrainSettings:
    steps: int = 600
    batch_size: int = 1024
    lr: float = 1e-3
    aux_alpha: float = 1 / 32
    l1: float = 0.0
    seed: int = 0
    log_every: int = 50


@dataclass
class TrainResult:
    sae: TopKSAE
    history: list[dict[str, float]] = field(default_factory=list)
    fvu: float = 0.0
    dead_fraction: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"fvu": self.fvu, "dead_fraction": self.dead_fraction, "steps": len(self.history) and
                self.history[-1]["step"], "shape": asdict(self.sae.shape)}


class BatchSource(Protocol):
    """Token activations an SAE trains on, possibly larger than memory (``shared.curation.cache``)."""

    def moments(self) -> tuple[int, torch.Tensor, float]:
        """(rows, mean vector, mean squared norm) of the training rows."""

    def probe(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """About ``n`` training rows, drawn at random (initialises the encoder's scale)."""

    def batches(self, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Shuffled training batches of ``size`` rows, for ever (epoch after epoch)."""


class TensorSource:
    """A :class:`BatchSource` over one in-memory [N, d] tensor (epochs of a random permutation)."""

    def __init__(self, activations: torch.Tensor):
        if activations.ndim != 2:
            raise ValueError(f"activations have shape {tuple(activations.shape)}; expected [N, d]")
        self.x = activations.float()

    def moments(self) -> tuple[int, torch.Tensor, float]:
        return self.x.shape[0], self.x.mean(dim=0), float(self.x.pow(2).sum(dim=1).mean())

    def probe(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.x[torch.randperm(self.x.shape[0], generator=generator)[:n]]

    def batches(self, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        n = self.x.shape[0]
        order, cursor = torch.randperm(n, generator=generator), 0
        while True:
            if cursor + size > n:
                order, cursor = torch.randperm(n, generator=generator), 0
            yield self.x[order[cursor: cursor + size]]
            cursor += size


def train_sae(activations: torch.Tensor | BatchSource, shape: SAEShape, settings: TrainSettings,
              log: Any = None, device: str | torch.device = "cpu") -> TrainResult:
    """Train on token activations: an in-memory [N, d_in] tensor or a streamed :class:`BatchSource`.
    ``log(line)`` receives progress lines; ``result.fvu`` is measured on the training rows (in memory) or left for
    the caller to measure on held-out rows (streamed)."""
    source = TensorSource(activations) if isinstance(activations, torch.Tensor) else activations
    rows, mean, mean_sq = source.moments()
    if isinstance(source, TensorSource) and source.x.shape[1] != shape.d_in:
        raise ValueError(f"activations have shape {tuple(source.x.shape)}; expected [N, {shape.d_in}]")
    if rows < 2:
        raise ValueError("need at least 2 activation vectors to train an SAE")
    gen = torch.Generator().manual_seed(settings.seed)
    sae = TopKSAE(shape, generator=gen).to(device)
    with torch.no_grad():
        sae.input_scale.fill_(float((shape.d_in / max(mean_sq, 1e-12)) ** 0.5))
        sae.b_pre.copy_(mean.to(device) * sae.input_scale)
        # k unit-norm atoms with activations of the input's size overshoot the input by about sqrt(k): scale the
        # encoder (TopK-ReLU codes are linear in it) so that the first reconstructions have the inputs' size
        probe = source.probe(settings.batch_size, gen).to(device)
        centred = probe * sae.input_scale - sae.b_pre
        recon = sae.decode(*sae.encode(probe)) - sae.b_pre
        sae.encoder.weight.mul_(float(centred.norm(dim=1).mean() / recon.norm(dim=1).mean().clamp_min(1e-12)))
    optimizer = torch.optim.Adam(sae.parameters(), lr=settings.lr)
    result = TrainResult(sae=sae)
    batches = source.batches(settings.batch_size, gen)
    for step in range(1, settings.steps + 1):
        batch = next(batches).to(device, non_blocking=True)
        terms = sae.loss(batch, settings.aux_alpha, settings.l1)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        sae.remove_parallel_gradient()
        optimizer.step()
        sae.normalise_decoder()
        if step % settings.log_every == 0 or step == settings.steps:
            record = {"step": step, **{k: float(v.detach()) for k, v in terms.items()},
                      "dead_fraction": float(sae.dead_mask().float().mean())}
            result.history.append(record)
            if log is not None:
                log(f"sae step {step}/{settings.steps}: loss {record['loss']:.4f} nmse {record['nmse']:.4f} "
                    f"auxk {record['auxk']:.4f} dead {record['dead_fraction']:.1%}")
    sae.eval()
    if isinstance(source, TensorSource):
        result.fvu = sae.fraction_of_variance_unexplained(source.x.to(device))
    result.dead_fraction = float(sae.dead_mask().float().mean())
    return result


@dataclass
class FVU:
    """Fraction of variance unexplained, accumulated over batches: sum ||x^ - x||^2 / sum ||x - mean||^2."""

    error: float = 0.0
    total: float = 0.0
    sq_norm: float = 0.0
    rows: int = 0
    sum: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, sae: TopKSAE, x: torch.Tensor) -> None:
        xs = x.float() * sae.input_scale
        self.error += float((sae.decode(*sae.encode(x.float())) - xs).pow(2).sum())
        self.sq_norm += float(xs.pow(2).sum())
        self.rows += xs.shape[0]
        part = xs.sum(dim=0).double().cpu()
        self.sum = part if self.sum is None else self.sum + part

    @property
    def value(self) -> float | None:
        if not self.rows or self.sum is None:
            return None
        spread = self.sq_norm - float(self.sum.pow(2).sum()) / self.rows
        return self.error / max(spread, 1e-12)


def sae_state(sae: TopKSAE) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for safetensors, shape fields for YAML)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    return tensors, asdict(sae.shape)


def sae_from_state(tensors: dict[str, torch.Tensor], shape: dict[str, Any]) -> TopKSAE:
    sae = TopKSAE(SAEShape(**shape))
    sae.load_state_dict(tensors)
    return sae.eval()


def pooled_codes(sae: TopKSAE, acts: torch.Tensor, mask: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """[B, n_latents]: SAE codes of every counted token ([B, T, d_in] with [B, T] mask), mean-pooled, L2-normalised
    (unless ``normalise`` is False)."""
    values, indices = sae.encode(acts.float())  # [B, T, k] each
    values = values * mask.unsqueeze(-1)
    batch = acts.shape[0]
    pooled = torch.zeros(batch, sae.shape.n_latents, dtype=values.dtype, device=values.device)
    pooled.scatter_add_(1, indices.reshape(batch, -1), values.reshape(batch, -1))
    pooled = pooled / mask.sum(dim=1, keepdim=True).clamp_min(1)
    return F.normalize(pooled, dim=-1) if normalise else pooled


@dataclass
class PooledViews:
    """One micro-batch's documents pooled three ways over their counted tokens, each [B, n_latents], unnormalised."""

    mean: torch.Tensor
    """Mean activation of each latent (FineScope's pooling)."""
    max: torch.Tensor
    """Largest activation of each latent."""
    fired: torch.Tensor
    """Share of counted tokens on which each latent fires (binarised firing)."""


def pooled_views(sae: TopKSAE, acts: torch.Tensor, mask: torch.Tensor) -> PooledViews:
    """Mean, max and firing-share pooling of the SAE codes of every counted token ([B, T, d_in], [B, T] mask)."""
    values, indices = sae.encode(acts.float())  # [B, T, k] each
    values = values * mask.unsqueeze(-1)
    batch, n = acts.shape[0], sae.shape.n_latents
    flat_idx, flat_val = indices.reshape(batch, -1), values.reshape(batch, -1)
    tokens = mask.sum(dim=1, keepdim=True).clamp_min(1).to(values.dtype)
    mean = torch.zeros(batch, n, dtype=values.dtype, device=values.device).scatter_add_(1, flat_idx, flat_val)
    peak = torch.zeros(batch, n, dtype=values.dtype, device=values.device).scatter_reduce_(
        1, flat_idx, flat_val, reduce="amax", include_self=True)
    fired = torch.zeros(batch, n, dtype=values.dtype, device=values.device).scatter_add_(
        1, flat_idx, (flat_val > 0).to(values.dtype))
    return PooledViews(mean=mean / tokens, max=peak, fired=fired / tokens)


def token_idf(fires: torch.Tensor, tokens: int) -> torch.Tensor:
    """[n_latents] log((T + 1) / (1 + tokens where the latent fires)) over T sample tokens: an idf from per-token
    firing rates, which (unlike document frequency) does not saturate when most latents fire somewhere in most
    documents."""
    return torch.log((tokens + 1.0) / (1.0 + fires.float())).clamp_min(0.0)


def firing_tfidf(fired: torch.Tensor, idf: torch.Tensor) -> torch.Tensor:
    """Firing shares weighted by a per-latent idf, L2-normalised (TF-IDF over latents)."""
    return F.normalize(fired * idf, dim=-1)


def lift_weights(seed_fired: torch.Tensor, corpus_fired: torch.Tensor, floor: float = 1e-4) -> torch.Tensor:
    """[n_latents] log of how much more often a latent fires on the seeds than on the corpus sample (mean firing
    shares, [S, n] and [n]), clipped at zero: latents the seeds do not use more than the corpus get no weight."""
    return torch.log((seed_fired.mean(dim=0) + floor) / (corpus_fired + floor)).clamp_min(0.0)


def idf_weights(pooled: torch.Tensor) -> torch.Tensor:
    """[n_latents] log(N / (1 + documents where the latent fires)) from [N, n_latents] pooled codes of a sample."""
    documents = (pooled > 0).sum(dim=0).float()
    return torch.log(pooled.shape[0] / (1.0 + documents)).clamp_min(0.0)


def idf_codes(pooled: torch.Tensor, idf: torch.Tensor) -> torch.Tensor:
    """Pooled codes re-weighted like tf-idf (sqrt of the mean activation times the latent's idf), L2-normalised.
    Latents that fire in almost every document (formatting, position) stop dominating the cosine."""
    return F.normalize(pooled.clamp_min(0).sqrt() * idf, dim=-1)
