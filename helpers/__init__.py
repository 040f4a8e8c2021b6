"""Helpers that pretraining, detection and the study runner share."""
