"""The attack: the batched stop-at-flip engine and its certified early stop, step-size
schedules, the plan of a job, minimum-norm reference attacks."""
