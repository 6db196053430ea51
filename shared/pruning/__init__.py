"""Structured pruning of LLaMA-family causal LMs (LLaMA, Mistral, Qwen2 module layouts), in plain torch.

- ``groups``: which weights move together (a KV group with its query heads; an MLP channel), layer ranges, the
  architecture check;
- ``solver``: how many KV groups and channels to keep so a given fraction of the parameters goes;
- ``importance``: per-group scores (first-order Taylor, vector-wise Taylor, diagonal-Fisher second order,
  magnitude, random) accumulated micro-batch by micro-batch;
- ``surgery``: keep the best groups, slice the weights, build the smaller model;
- ``modeling_scopeforge_pruned``: the model classes for per-layer widths (saved beside the weights).
"""
