"""Templates shipped with the package (the model card)."""
