"""Ray Serve application for mve checkpoints (classifier and VAE)."""
