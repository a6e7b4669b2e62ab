"""Sub-commands of `pdm` that have no other home (see `progressive_denoising.cli`)."""
