"""The attack: the batched stop-at-flip engine, step-size schedules, the plan of a job,
minimum-norm reference attacks."""
