"""Deploy stage Lambdas: the gate (deploy or skip), the release (model, config, endpoint), the finish
(autoscaling and the in-service record). The state machine waits between release and finish."""
