"""A curation model: everything needed to score documents against the seeds, saved with the stage and reloadable.

It is what :func:`shared.curation.features.fit_curation` learns on a corpus sample (the layer, its selected
coordinates, the TopK SAE, latent idf, the seed vectors and seed ids), so a curated model can score another corpus
later without refitting. Layout under the folder it is saved to::

    sae/sae.safetensors         SAE weights
    sae/latent_idf.safetensors  latent idf (document frequency: latent_idf; per-token firing rate: token_idf)
    sae/seeds.safetensors       the seeds' vectors, one [S, d] tensor per kind (sae, sae_idf, dense)
    sae/config.yaml             base model, layer, selector, skip_first_token, SAE shape, seed ids
    coordinates.json            the selected coordinates and their selector scores
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import yaml

from shared.curation.activations import truncate_to_layer
from shared.curation.features import KINDS, Embedder
from shared.curation.fit import FitResult, FitSettings
from shared.curation.sae import SAEShape, TopKSAE, sae_from_state, sae_state
from shared.errors import DataError
from shared.storage import Storage

FILES = ("sae/config.yaml", "sae/sae.safetensors", "sae/latent_idf.safetensors", "sae/seeds.safetensors",
         "coordinates.json")


@dataclass
class CurationModel:
    model: str
    """The base causal LM whose activations are encoded (a name, path or ``s3://`` URI)."""
    layer: int
    """Decoder layer whose output is read."""
    selector: str
    """How ``coords`` were chosen (jvp, variance, ...)."""
    skip_first_token: bool
    """Whether the first real token of a document is left out of pooling."""
    coords: np.ndarray
    """[k] hidden-state coordinates fed to the SAE."""
    coordinate_scores: np.ndarray
    """[k] the selector's score of each selected coordinate."""
    sae: TopKSAE
    idf: np.ndarray
    """[n_latents] latent idf over the fitting sample (document frequency)."""
    token_idf: np.ndarray
    """[n_latents] latent idf over the fitting sample's tokens (per-token firing rate)."""
    seeds: dict[str, np.ndarray]
    """Per kind of document vector (:data:`KINDS`), the seeds' vectors [S, d]."""
    seed_ids: list[str]
    """The id of each seed, in the order of the seed vectors."""

    def fingerprint(self, *extra: np.ndarray) -> str:
        """A digest of everything that determines a document's scores (with ``extra`` arrays such as the DSIR
        weights): two models with one fingerprint score every document the same."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{self.model}|{self.layer}|{self.skip_first_token}|{self.seed_ids}".encode())
        arrays = [self.coords, self.idf, self.token_idf, *(self.seeds[k] for k in sorted(self.seeds)), *extra]
        arrays += [t.detach().cpu().float().numpy() for _, t in sorted(self.sae.state_dict().items())]
        for array in arrays:
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    @classmethod
    def from_fit(cls, fit: FitResult, model: str, settings: FitSettings, seed_ids: list[str]) -> CurationModel:
        """The model a fit on ``model`` learned; ``seed_ids`` name the seeds in the order they were embedded."""
        if len(seed_ids) != next(iter(fit.seeds.values())).shape[0]:
            raise ValueError(f"{len(seed_ids)} seed ids for {next(iter(fit.seeds.values())).shape[0]} seed vectors")
        return cls(model=model, layer=fit.layer, selector=settings.selector, skip_first_token=settings.skip_first,
                   coords=fit.coords, coordinate_scores=fit.coordinate_scores[fit.coords], sae=fit.sae, idf=fit.idf,
                   token_idf=fit.token_idf, seeds=fit.seeds, seed_ids=list(seed_ids))

    def embedder(self, model: Any, tokenizer: Any) -> Embedder:
        """The scoring embedder on a loaded base model (truncated to :attr:`layer`)."""
        tensor = lambda a: torch.tensor(np.array(a))  # noqa: E731  (a writable copy of Ray's read-only arrays)
        return Embedder(base=truncate_to_layer(model, self.layer), pad_id=tokenizer.pad_token_id,
                        coords=tensor(self.coords), sae=copy.deepcopy(self.sae).eval(),
                        skip_first=self.skip_first_token, idf=tensor(self.idf),
                        token_idf=tensor(self.token_idf),
                        seeds={kind: tensor(v) for kind, v in self.seeds.items()})

    @property
    def shape(self) -> SAEShape:
        return self.sae.shape

    def save(self, store: Storage) -> None:
        from safetensors.torch import save

        tensors, shape = sae_state(self.sae)
        store.write_bytes(save(tensors), "sae", "sae.safetensors")
        idf = {"latent_idf": torch.as_tensor(np.array(self.idf)),
               "token_idf": torch.as_tensor(np.array(self.token_idf))}
        store.write_bytes(save(idf), "sae", "latent_idf.safetensors")
        store.write_bytes(save({k: torch.as_tensor(np.array(v)) for k, v in self.seeds.items()}), "sae",
                          "seeds.safetensors")
        meta = {"model": self.model, "layer": self.layer, "selector": self.selector,
                "skip_first_token": self.skip_first_token, **shape, "seed_ids": list(self.seed_ids)}
        store.write_text(yaml.safe_dump(meta, sort_keys=False), "sae", "config.yaml")
        store.write_json({"layer": self.layer, "selector": self.selector,
                          "indices": [int(i) for i in self.coords],
                          "scores": [float(s) for s in self.coordinate_scores]}, "coordinates.json")

    @classmethod
    def load(cls, store: Storage) -> CurationModel:
        """The model saved by :meth:`save` under ``store`` (a committed curate stage's folder)."""
        from safetensors.torch import load

        missing = [name for name in FILES if not store.exists(*name.split("/"))]
        if missing:
            raise DataError(f"curation model {store.uri()}: {', '.join(missing)} missing (a committed curate stage "
                            "holds them)")
        meta = yaml.safe_load(store.read_text("sae", "config.yaml"))
        coordinates = store.read_json("coordinates.json")
        tensors = load(store.read_bytes("sae", "sae.safetensors"))
        idf = load(store.read_bytes("sae", "latent_idf.safetensors"))
        seeds = load(store.read_bytes("sae", "seeds.safetensors"))
        if "token_idf" not in idf:
            raise DataError(f"curation model {store.uri()}: latent_idf.safetensors has no token_idf (saved by an "
                            "older scopeforge; run curate again)")
        shape = {name: meta[name] for name in SAEShape.__dataclass_fields__}
        if set(seeds) != set(KINDS):
            raise DataError(f"curation model {store.uri()}: seeds.safetensors holds {sorted(seeds)}, expected "
                            f"{sorted(KINDS)}")
        return cls(model=meta["model"], layer=int(meta["layer"]), selector=meta["selector"],
                   skip_first_token=bool(meta["skip_first_token"]),
                   coords=np.asarray(coordinates["indices"], dtype=np.int64),
                   coordinate_scores=np.asarray(coordinates["scores"], dtype=np.float32),
                   sae=sae_from_state(tensors, shape), idf=idf["latent_idf"].numpy(),
                   token_idf=idf["token_idf"].numpy(),
                   seeds={k: v.numpy() for k, v in seeds.items()}, seed_ids=[str(i) for i in meta["seed_ids"]])
