"""Training stage: build the SageMaker training or tuning request (prepare) and record the result (report)."""
