"""Video DiTs written here, weight-compatible with diffusers state dicts."""
