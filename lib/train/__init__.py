"""Training the classifier: the loop with a checkpoint per epoch, its batches, evaluation."""
