"""The train use case: pre-flight checks, the batch decision and out-of-memory step-down, runs, resumes and sweeps."""
