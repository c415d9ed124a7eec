"""Training scripts for the embedded models (never run by set-up or tests; see README.md for timings)."""
