"""Evaluation: lm-eval integration, offline benchmark data, recall probes, reports and load testing."""
