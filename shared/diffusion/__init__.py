"""Image generation and curation for the diffusion-deepfake pipeline, in plain torch/numpy (no Ray here).

- ``pipelines``: diffusers pipelines as generators (load a reference, swap the sampler, seeded sampling per image;
  pixel-space unconditional / img2img, text2img / img2img on text-conditioned pipelines)
- ``gan``: the DCGAN face generator of the gan-face-generate wheel (a non-diffusion manipulation type)
- ``generate``: requests (id, per-image seed, prompt, source image) and the per-batch ``GeneratorStage``
- ``ddpm``: a small DDPM trained on a few real images (the train-ddpm job)
- ``vae``: a small convolutional VAE trained on a few real images (the train-vae job; the generate job's vae mode)
- ``prompts``: composed face prompts and prompt files
- ``realsets``: real image collections (the embedded lfw-faces, folders, Parquet)
- ``phash`` / ``curation``: perceptual hashes, near-duplicate search, the curate-images steps
- ``report``: contact sheets and the jobs' reports
- ``tiny``: pipelines built from configs with random weights, for tests and benchmarks

The dataset format they all write is ``shared/imageset.py``.
"""
