"""Post-training compression from calibration data: GPTQ, AWQ, SmoothQuant, SparseGPT,
Wanda, and round-to-nearest on the same grids, as `Method`s for any model."""
