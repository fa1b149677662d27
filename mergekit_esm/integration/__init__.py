"""mergekit wiring: recipe checks, the pre-pass, the merge kernel and the run_merge wrapper."""
