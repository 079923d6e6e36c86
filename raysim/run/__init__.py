"""Running a federated job: the engine's round loop, the run directory and its storage,
checkpoints, worker groups, seeding, memory sampling and the report."""
