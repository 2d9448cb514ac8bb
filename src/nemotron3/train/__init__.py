"""Training pieces. So far: the WSD learning-rate schedule and MoE expert balancing (the pretraining loop, data and
resume come with the pretraining issue)."""
