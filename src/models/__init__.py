"""Model helpers: the embedded default model (`embedded`)."""
