"""The `hf-ext` command line: thin argparse layers over hf_ext's pure functions."""
