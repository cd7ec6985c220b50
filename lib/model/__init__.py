"""The classifier: AlexNet with its normalisation, its weights files, the forward precision."""
