"""Trainers: FMFP (SAM + SWA) for classifiers."""
