"""DiT-IC: a one-step DiT image codec writing real bitstreams (`ditc codec`)."""
