"""Command-line entry points of transfusion_hf (`python -m transfusion_hf.hub` runs `commands.hub`)."""
