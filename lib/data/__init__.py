"""Reading the data: the Cholec80 layout, the synthetic dataset in it, the frame cache, splits."""
